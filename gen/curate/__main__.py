"""python -m gen.curate --queries RUN_DIR [--out DIR] [--SETTING VALUE ...]

Re-curates a finished generation run with other settings, without calling the LLM. Every
CurateConfig field is an option (--near-dup-threshold 0.7, --summary-share 0.3, ...);
tuple fields repeat (--decontaminate-against a.jsonl --decontaminate-against b.jsonl).

Exit codes: 0 done; 2 bad usage or input (a missing or damaged run file, a refused
publication), nothing created; 143 stopped by SIGTERM, SIGHUP or Ctrl-C, shards/latest left
where it was.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from gen.atomic import stop_signals
from gen.curate import CurateConfig, InputError
from gen.publish import KEEP_VERSIONS, MIN_SHARE, PublishRefused

EXIT_STOPPED = 143


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gen.curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", required=True, type=Path, metavar="RUN_DIR",
                   help="run directory with queries.parquet and captions.parquet")
    p.add_argument("--out", type=Path, help="output folder (default: a new version under "
                   "RUN_DIR/shards/, and shards/latest moved to it, as gen.run does)")
    p.add_argument("--keep-versions", type=int, default=KEEP_VERSIONS,
                   help=f"without --out: versions kept under RUN_DIR/shards/ (default: {KEEP_VERSIONS})")
    p.add_argument("--min-share-of-previous", type=float, default=MIN_SHARE,
                   help="without --out: refuse a version with fewer pairs than this share of "
                   f"shards/latest's, 0-1 (default: {MIN_SHARE})")
    p.add_argument("--allow-shrink", dest="min_share_of_previous", action="store_const", const=0.0,
                   help="publish however much the pairs shrank")
    for name, field in CurateConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        is_tuple = typing.get_origin(field.annotation) is tuple
        default = field.default if not is_tuple or len(field.default) < 6 else f"{len(field.default)} built-in entries"
        help_text = f"default: {default}" + ("; repeat for several, 'none' for empty" if is_tuple else "")
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
        print(f"invalid settings:\n{e}", file=sys.stderr)
        return 2
    if args.keep_versions < 1 or not 0 <= args.min_share_of_previous <= 1:
        print("invalid settings: --keep-versions must be 1 or more, --min-share-of-previous 0-1",
              file=sys.stderr)
        return 2
    with stop_signals():   # a stop raises where the work is; the partial version is removed
        try:
            manifest = _curate(args, config)
        except (FileNotFoundError, InputError, PublishRefused) as e:   # a run or judge file the settings need
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            where = "shards/latest" if args.out is None else str(args.out)
            if getattr(e, "published", False):
                print(f"stopped: the new curation was complete and {where} holds it", file=sys.stderr)
            else:
                print(f"stopped: nothing new was published, {where} was left as it was", file=sys.stderr)
            return EXIT_STOPPED
    summary = {k: manifest["stats"][k] for k in ("queries_in", "pairs_out", "dropped_by_reason", "splits")}
    print(json.dumps({"fingerprint": manifest["fingerprint"], **summary,
                      "timings_s": manifest["timings_s"]}, ensure_ascii=False, indent=2))
    return 0


def _curate(args: argparse.Namespace, config: CurateConfig) -> dict:
    from gen.curate import check_run_dir
    from gen.publish import curate_into, curate_versioned  # the same versions and pointer as gen.run
    if args.out is not None:
        return curate_into(args.queries, config, args.out)
    from gen.run import UsageError, lock_out_dir
    check_run_dir(args.queries)   # before the lock file: a mistyped path must stay absent
    try:
        lock = lock_out_dir(args.queries)   # not while gen.run publishes there
    except UsageError as e:
        raise PublishRefused(str(e)) from None
    try:
        return curate_versioned(args.queries, config, keep=args.keep_versions,
                                min_share=args.min_share_of_previous)
    finally:
        lock.close()


if __name__ == "__main__":
    import signal
    with stop_signals(after=signal.SIG_IGN):
        code = main()
    sys.exit(code)
