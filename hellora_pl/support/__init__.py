"""Which MoE families of the installed transformers hellora_pl supports, checked, not claimed.

`python -m hellora_pl.support` scans transformers for experts-interface families, builds each tiny
from its own config class, and checks it against an oracle independent of hellora_pl's merge
(`oracle.py`); `--readme README.md` rewrites the README's support table from the result.
"""

from .matrix import FamilyResult, check_family, moe_families

__all__ = ["FamilyResult", "check_family", "moe_families"]
