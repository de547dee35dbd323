"""The support matrix (hellora_pl/support): every MoE family of the installed transformers is checked
end to end on a tiny model and is either supported or refused by name, never run wrongly; the
README's table is the matrix's output.

`check_family` builds each family tiny from its own config class, profiles it, adapts it with
`hellora` and `lora`, and compares the logits with an oracle that folds the adapters into a copy of
the weights and runs transformers' own eager experts (hellora_pl/support/oracle.py), B = 0 with the
base, and two training steps with adapter-only changes. A family's status "failed" is a bug.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import transformers

from hellora_pl.support.__main__ import main as support_main
from hellora_pl.support.matrix import FamilyResult, check_family, moe_families
from hellora_pl.support.table import END, START, _cell, markdown, replace_section, summary

README = Path(__file__).resolve().parents[1] / "README.md"
FAMILIES = moe_families()

# The families the issue names, each supported or refused by name (and these stay supported).
NAMED = {
    "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next", "gpt_oss", "gemma4_text", "gemma4", "glm4_moe", "deepseek_v3",
    "deepseek_v4", "nemotron_h", "granitemoehybrid", "ernie4_5_moe", "minimax_m2", "llama4_text",
}  # fmt: skip
STAY_SUPPORTED = NAMED - {"llama4_text"}  # llama4's experts lack the experts interface: refused by name


@functools.cache
def result_of(model_type: str) -> FamilyResult:
    family, _, kind = next(row for row in FAMILIES if row[1] == model_type)
    return check_family(model_type, kind, family)


@pytest.mark.parametrize("model_type", [row[1] for row in FAMILIES])
def test_every_moe_family_is_supported_or_refused_by_name(model_type):
    result = result_of(model_type)
    assert result.status != "failed", f"{model_type}: {result.reason}"
    if result.status == "supported":
        assert max(result.oracle_difference.values()) <= 1e-5 and max(result.base_difference.values()) <= 1e-6
    else:
        assert result.reason, f"{model_type} is {result.status} without a reason"


def test_the_issues_named_families_are_in_the_matrix_and_stay_supported():
    types = {row[1] for row in FAMILIES}
    assert NAMED <= types, f"missing from the scan: {sorted(NAMED - types)}"
    for model_type in sorted(STAY_SUPPORTED):
        result = result_of(model_type)
        assert result.status == "supported", f"{model_type}: {result.status}: {result.reason}"
    assert result_of("llama4_text").status == "refused"


def _readme_rows() -> tuple[str, dict[str, tuple[str, str]]]:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, "README.md has no support table"
    section = text.split(START, 1)[1].split(END, 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("family", "---"):
            rows[cells[1]] = (cells[3], cells[6])
    return section, rows


def test_the_readme_table_is_the_matrix_of_the_installed_transformers():
    section, rows = _readme_rows()
    checked_with = re.search(r"Checked with transformers ([\w.]+),", section)
    assert checked_with, "the table does not say which transformers it checked"
    if checked_with.group(1) != transformers.__version__:
        pytest.skip(
            f"README's table was made with transformers {checked_with.group(1)}, this is {transformers.__version__}; "
            "the families are still checked above (rewrite it with `python -m hellora_pl.support --readme README.md`)"
        )
    assert set(rows) == {row[1] for row in FAMILIES}, "model types in the README differ from the scan"
    for model_type, (status, reason) in rows.items():
        result = result_of(model_type)
        assert status == result.status, f"{model_type}: README says {status}, the matrix {result.status}"
        if status != "supported":
            assert reason == _cell(result.reason), f"{model_type}: README's reason is stale"
    assert "| failed |" not in section


def test_at_least_four_in_five_families_are_supported():
    results = [result_of(row[1]) for row in FAMILIES]
    counts = summary(results)
    assert counts["types_failed"] == 0
    assert counts["families_supported"] >= 0.8 * counts["families"], counts


def test_the_table_says_what_was_checked_and_why_not():
    rows = [
        FamilyResult("a", "a", "decoder", "supported", oracle_difference={"lora": 2e-7, "hellora": 1e-7}),
        FamilyResult("b", "b_text", "decoder", "refused", reason="its MoE block | has no router"),
        FamilyResult("b", "b", "multimodal", "not built", reason="ValueError: tiny"),
    ]
    table = markdown(rows, "transformers x")
    assert "2 of 3 families" not in table and "1 of 2 families have a supported model type" in table
    assert "| a | a | decoder | supported | plain | - | 2.0e-07 |" in table
    assert "its MoE block / has no router" in table  # a | would split the cell


def test_replacing_the_section_needs_its_markers(tmp_path):
    with pytest.raises(ValueError, match="support-table markers"):
        replace_section("# no table\n", "table")
    assert replace_section(f"head\n{START}\nold\n{END}\ntail", "new") == f"head\n{START}\nnew\n{END}\ntail"


def test_the_command_refuses_an_unknown_model_type_before_checking(capsys):
    with pytest.raises(SystemExit) as exit_info:
        support_main(["--only", "not_a_model_type"])
    assert exit_info.value.code == 2
    assert "not_a_model_type is not" in capsys.readouterr().err


def test_only_the_pinned_families_are_refused_or_not_built():
    """A family that starts being refused (or stops building) is a change someone must see: the refusals
    are pinned with their reasons in tests/test_detection.py, the one tiny config gap here."""
    from test_detection import REFUSED

    not_built = {"qwen3_omni_moe": "has no forward (generate only)"}
    results = {row[1]: result_of(row[1]) for row in FAMILIES}
    assert {t for t, r in results.items() if r.status == "refused"} == set(REFUSED)
    assert {t for t, r in results.items() if r.status == "not built"} == set(not_built)
    for model_type, words in not_built.items():
        assert words in results[model_type].reason
