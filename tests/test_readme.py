"""The README's commands and its own-module snippet stay true to the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_MARKER = "<!-- readme-snippet: own-module -->"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def snippet_after(marker: str, text: str) -> str:
    """The first ```python block that follows `marker`."""
    start = text.index(marker)
    found = re.search(r"```python\n(.*?)```", text[start:], flags=re.DOTALL)
    assert found, f"no python code block after {marker!r} in README.md"
    return found.group(1)


def test_readme_names_the_test_and_quickstart_commands():
    text = readme()
    assert "python -m pytest -q" in text
    assert "python -m hellora_pl fit --config configs/quickstart.yaml" in text


def test_own_module_snippet_runs(tmp_path):
    code = snippet_after(SNIPPET_MARKER, readme())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "hot experts per layer:" in output, output[-6000:]
    assert "adapted experts" in output, output[-6000:]
