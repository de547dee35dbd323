"""`python -m hellora_pl.support [--readme README.md] [--json PATH] [--only TYPE ...]`: run the matrix."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import transformers

from .matrix import check_family, moe_families
from .table import markdown, replace_section, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hellora_pl.support", description=__doc__)
    parser.add_argument("--readme", type=Path, help="rewrite the support table between its markers in this file")
    parser.add_argument("--json", type=Path, help="also write every row's figures here")
    parser.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="check only these model types")
    args = parser.parse_args(argv)
    if args.readme is not None and not args.readme.is_file():
        parser.error(f"--readme {args.readme}: no such file")
    rows = [row for row in moe_families() if not args.only or row[1] in args.only]
    if args.only and len(rows) != len(set(args.only)):
        missing = sorted(set(args.only) - {t for _, t, _ in rows})
        parser.error(f"--only: {', '.join(missing)} is not an MoE model type of this transformers (see the table: python -m hellora_pl.support)")
    results = []
    for family, model_type, kind in rows:
        result = check_family(model_type, kind, family)
        print(f"{model_type:32s} {result.status:10s} {result.reason[:100]}", file=sys.stderr)
        results.append(result)
    versions = f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}"
    table = markdown(results, versions)
    print(table)
    if args.json is not None:
        payload = {"versions": versions, "summary": summary(results), "rows": [dataclasses.asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if args.readme is not None:
        args.readme.write_text(replace_section(args.readme.read_text(), table))
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
