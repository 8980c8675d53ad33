"""Versioned curation: each curation goes to shards/<version>/ beside the older ones, and
shards/latest points at the newest good one. The pointer is a symlink swapped atomically,
and only after a curation finished, so a trainer reading shards/latest never sees a half
version; a failed curation leaves it where it was.

A rerun whose inputs (the run's queries and captions, the judge's grades it uses, and the
curation settings) are those of the latest version makes no new version: scheduled jobs
pay only for what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from gen.atomic import atomic_path
from gen.card import write_card
from gen.curate import CurateConfig, curate, judged

KEEP_VERSIONS = 5


def _inputs_digest(run_dir: Path, config: CurateConfig) -> str:
    h = hashlib.sha256(config.fingerprint().encode())
    # The judge's files change the output too: a re-judged run must make a new version.
    judge_files = judged.inputs(run_dir, config.judge, config.judge_candidates)
    for path in [run_dir / "queries.parquet", run_dir / "captions.parquet", *judge_files]:
        if not path.is_file():
            continue  # curate() names what is missing
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _point(latest: Path, version: str) -> None:
    tmp = latest.with_name(f".latest.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)        # relative: the tree can move as a whole
    os.replace(tmp, latest)


def _prune(root: Path, keep: int, current: str) -> None:
    versions = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0].isdigit())
    for old in versions[:-keep]:
        if old.name != current:
            shutil.rmtree(old)


def latest_version(run_dir: Path) -> tuple[str, str] | None:
    """(version, inputs digest) of shards/latest, or None when there is no version to reuse."""
    latest = run_dir / "shards" / "latest"
    if not ((latest / "inputs.json").is_file() and (latest / "manifest.json").is_file()):
        return None
    return os.readlink(latest), json.loads((latest / "inputs.json").read_text())["digest"]


def reusable(run_dir: Path, config: CurateConfig) -> str | None:
    """The version a curation of the run's present files would reuse; None: it makes a new one.
    The rule curate_versioned follows, and what --dry-run reports."""
    current = latest_version(run_dir)
    return current[0] if current and current[1] == _inputs_digest(run_dir, config) else None


def curate_versioned(run_dir: Path, config: CurateConfig, keep: int = KEEP_VERSIONS,
                     generation: Optional[dict] = None) -> dict[str, Any]:
    """generation: the run's manifest, for the dataset card (gen/card.py); None reads the
    finished run's manifest.json."""
    root = run_dir / "shards"
    root.mkdir(parents=True, exist_ok=True)
    latest = root / "latest"
    digest = _inputs_digest(run_dir, config)
    current = latest_version(run_dir)
    if current and current[1] == digest:
        manifest = json.loads((latest / "manifest.json").read_text())
        return {"version": current[0], "reused": True, **manifest}
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + digest[:8]
    manifest = curate(run_dir, config, out_dir=root / version)
    write_card(root / version, run_dir, config, manifest, generation)
    with atomic_path(root / version / "inputs.json") as tmp:
        tmp.write_text(json.dumps({"digest": digest, "curation_fingerprint": config.fingerprint()}) + "\n")
    _point(latest, version)
    _prune(root, keep, version)
    return {"version": version, "reused": False, **manifest}
