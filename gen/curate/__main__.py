"""python -m gen.curate --queries RUN_DIR [--out DIR] [--SETTING VALUE ...]

Re-curates a finished generation run with other settings, without calling the LLM. Every
CurateConfig field is an option (--near-dup-threshold 0.7, --summary-share 0.3, ...);
tuple fields repeat (--decontaminate-against a.jsonl --decontaminate-against b.jsonl).
A run past --partition-records records is curated in parts; --executor ray runs them as Ray
tasks (docs/ray.md).
Exit codes and log events are gen.run's (--log-format json for one JSON object a line); a
new version under RUN_DIR/shards/ takes the run directory's lock, as gen.run does (exit 75).
A missing or damaged run file is named, exit 2, nothing created; so is an --out that is the
run directory, a folder above it, or anything under its shards/ (--out takes the lock too).
The new curation is made whole in a hidden folder and moved in by renames a stop signal
waits for: stopped (143), shards/latest (or the --out folder) holds the previous curation
or the new one, never a mix.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from gen.curate import CurateConfig, InputError, check_run_dir
from gen.config import KEEP_VERSIONS, MIN_SHARE
from gen.settings import describe, problems

log = logging.getLogger("gen.curate")


def _parser() -> argparse.ArgumentParser:
    from gen.cli import Parser
    p = Parser(prog="python -m gen.curate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", required=True, type=Path, metavar="RUN_DIR",
                   help="run directory with queries.parquet and captions.parquet")
    p.add_argument("--out", type=Path, help="output folder (default: a new version under "
                   "RUN_DIR/shards/, and shards/latest moved to it, as gen.run does)")
    p.add_argument("--keep-versions", type=int, default=KEEP_VERSIONS,
                   help=f"without --out: versions kept under RUN_DIR/shards/ (at least 1; default: {KEEP_VERSIONS})")
    p.add_argument("--min-share-of-previous", type=float, default=MIN_SHARE,
                   help="without --out: refuse a version with fewer pairs than this share of "
                   f"shards/latest's (0-1; default: {MIN_SHARE})")
    p.add_argument("--allow-shrink", dest="min_share_of_previous", action="store_const", const=0.0,
                   help="publish however much the pairs shrank")
    p.add_argument("--log-format", choices=["text", "json"],
                   help="json: one object per line, for scheduled jobs (default: $CAPGEN_LOG_FORMAT or text)")
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


@dataclass
class Job:
    run_dir: Path
    out: Optional[Path]
    config: CurateConfig
    log_format: str
    keep_versions: int = KEEP_VERSIONS
    min_share: float = MIN_SHARE


def load(argv: list[str]) -> Job:
    from gen.cli import ConfigError, log_format_hint
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
        raise ConfigError("invalid settings: " + "; ".join(problems(e, CurateConfig, flag))) from None
    if args.keep_versions < 1 or not 0 <= args.min_share_of_previous <= 1:
        raise ConfigError("invalid settings: --keep-versions must be 1 or more, --min-share-of-previous 0-1")
    return Job(args.queries, args.out, config, args.log_format or log_format_hint(argv),
               args.keep_versions, args.min_share_of_previous)


def start_event(job: Job, command: str) -> tuple[str, dict]:
    from gen.run import note
    fingerprint = job.config.fingerprint()
    note(fingerprint=fingerprint)
    out = str(job.out) if job.out else str(job.run_dir / "shards")
    return f"{command} started: {job.run_dir} -> {out}", {
        "event": "start", "command": command, "run_dir": str(job.run_dir), "out": out,
        "fingerprint": fingerprint, "settings": job.config.model_dump(mode="json")}


def work(job: Job) -> int:
    from gen.publish import check_out, curate_into, curate_versioned  # the same versions and pointer as gen.run
    from gen.run import UsageError, lock_out_dir, note
    try:
        check_run_dir(job.run_dir)   # before the lock file: a mistyped path must stay absent
        if job.out is not None:
            check_out(job.run_dir, job.out)          # before the lock file: nothing created
        # With --out too: a run rewriting queries.parquet meanwhile would be read half made.
        lock = lock_out_dir(job.run_dir)              # and the same one writer at a time
        try:
            if job.out is None:
                manifest = curate_versioned(job.run_dir, job.config, keep=job.keep_versions,
                                            min_share=job.min_share)
                note(shards_version=manifest["version"], shards_reused=manifest["reused"])
            else:
                manifest = curate_into(job.run_dir, job.config, job.out)
        finally:
            lock.close()
    except (FileNotFoundError, InputError) as e:   # a run or judge file the settings need
        raise UsageError(str(e)) from None
    summary = {k: manifest["stats"][k] for k in ("queries_in", "pairs_out", "dropped_by_reason", "splits")}
    log.info("curated: %s pairs from %s queries", summary["pairs_out"], summary["queries_in"],
             extra={"fields": {"event": "curated", "shards_version": manifest.get("version"),
                               "shards_reused": manifest.get("reused"), "queries_in": summary["queries_in"],
                               "pairs": summary["pairs_out"], "splits": summary["splits"],
                               "dropped_by_reason": summary["dropped_by_reason"],
                               "curate_s": manifest["timings_s"].get("total")}})
    print(json.dumps({"fingerprint": manifest["fingerprint"], **summary,
                      "timings_s": manifest["timings_s"]}, ensure_ascii=False, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from gen.run import entry
    return entry(argv, work, command="gen.curate", load=load, start=start_event)


if __name__ == "__main__":
    import signal

    from gen.atomic import stop_signals
    with stop_signals(after=signal.SIG_IGN):   # a late Ctrl-C must not change the exit code
        code = main()
    sys.exit(code)
