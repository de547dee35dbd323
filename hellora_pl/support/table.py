"""The support matrix as a markdown table, and the README section it replaces."""

from __future__ import annotations

from collections.abc import Sequence

from .matrix import FamilyResult

START = "<!-- support-table:start (written by `python -m hellora_pl.support --readme README.md`) -->"
END = "<!-- support-table:end -->"


def summary(results: Sequence[FamilyResult]) -> dict[str, int]:
    """Counts by model type and by family (a family is supported when one of its model types is)."""
    families = {r.family for r in results}
    supported_families = {r.family for r in results if r.status == "supported"}
    counts = {f"types_{status}": sum(r.status == status for r in results) for status in _STATUSES}
    return {
        "types": len(results),
        **counts,
        "families": len(families),
        "families_supported": len(supported_families),
    }


_STATUSES = ("supported", "refused", "failed", "not built")


def markdown(results: Sequence[FamilyResult], versions: str) -> str:
    s = summary(results)
    lines = [
        f"Checked with {versions}: {s['types_supported']} of {s['types']} model types supported "
        f"({s['types_refused']} refused by name, {s['types_failed']} failed, {s['types_not built']} whose tiny "
        f"model does not build); {s['families_supported']} of {s['families']} families have a supported model type.",
        "",
        "| family | model type | kind | status | expert layout | mixers | max oracle difference / reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status == "supported":
            detail = f"{max(r.oracle_difference.values()):.1e}"
        else:
            detail = _cell(r.reason)
        layout = ", ".join(_short(d) for d in r.layout) or "plain"
        mixers = ", ".join(r.mixers) if len(r.mixers) > 1 else (r.mixers[0] if r.mixers else "-")
        lines.append(f"| {r.family} | {r.model_type} | {r.kind} | {r.status} | {layout} | {mixers} | {detail} |")
    return "\n".join(lines)


def _short(difference: str) -> str:
    """'transposed expert weights (is_transposed)' -> 'transposed expert weights'."""
    return difference.split(" (")[0]


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "/").split())[:200]


def replace_section(readme: str, table: str) -> str:
    """`readme` with the text between START and END replaced by `table`."""
    if START not in readme or END not in readme:
        raise ValueError(f"the README has no support-table markers; add the two lines\n{START}\n{END}\nwhere the table goes.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"
