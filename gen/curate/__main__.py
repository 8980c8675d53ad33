"""python -m gen.curate --queries RUN_DIR [--out DIR] [--SETTING VALUE ...]

Re-curates a finished generation run with other settings, without calling the LLM. Every
CurateConfig field is an option (--near-dup-threshold 0.7, --summary-share 0.3, ...);
tuple fields repeat (--decontaminate-against a.jsonl --decontaminate-against b.jsonl).
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from gen.curate import CurateConfig, curate
from gen.settings import describe, problems


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gen.curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", required=True, type=Path, metavar="RUN_DIR",
                   help="run directory with queries.parquet and captions.parquet")
    p.add_argument("--out", type=Path, help="output folder (default: a new version under "
                   "RUN_DIR/shards/, and shards/latest moved to it, as gen.run does)")
    for name, field in CurateConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        is_tuple = typing.get_origin(field.annotation) is tuple
        default = field.default if not is_tuple or len(field.default) < 6 else f"{len(field.default)} built-in entries"
        help_text = f"{describe(field)}; default: {default}" + ("; repeat for several, 'none' for empty" if is_tuple else "")
        if is_tuple:
            p.add_argument(flag, dest=name, action="append", metavar="VALUE", help=help_text)
        else:
            p.add_argument(flag, dest=name, metavar="VALUE", help=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = {}
    for name in CurateConfig.model_fields:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(v for v in value if v.lower() != "none")
        elif value.lower() == "none":
            value = None
        settings[name] = value
    try:
        config = CurateConfig.model_validate(settings)   # pydantic parses "0.7", "12", ...
    except ValidationError as e:
        flag = lambda names: "--" + names[-1].replace("_", "-")
        print("invalid settings: " + "; ".join(problems(e, CurateConfig, flag)), file=sys.stderr)
        return 2
    try:
        if args.out is None:
            from gen.publish import curate_versioned  # the same versions and pointer as gen.run
            manifest = curate_versioned(args.queries, config)
        else:
            manifest = curate(args.queries, config, args.out)
    except FileNotFoundError as e:   # a run or judge file the settings need
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: manifest["stats"][k] for k in ("queries_in", "pairs_out", "dropped_by_reason", "splits")}
    print(json.dumps({"fingerprint": manifest["fingerprint"], **summary,
                      "timings_s": manifest["timings_s"]}, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
