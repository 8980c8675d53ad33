"""Publishing, the sixth stage (card.py writes each version's dataset card): each curation goes to
shards/<version>/ beside the older ones, and shards/latest points at the newest good one. The
pointer is a symlink swapped atomically, and only after a curation finished, so a trainer
reading shards/latest never sees a half version; a failed or stopped curation leaves it where
it was, and its folder (written as shards/.<version>.partial) is removed.

A rerun whose inputs (the run's queries and captions, the judge's grades it uses, and the
curation settings) are those of the latest version makes no new version: scheduled jobs
pay only for what changed.

Shrink guard: a publication that keeps less than `min_share` of the previous one (a run's
captions, a version's pairs) is refused, the previous one kept: a nightly file that lost
most of its lines is far more often a broken export than a real deletion.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gen.atomic import all_or_none, atomic_path
from gen.publish.card import write_card
from gen.config import KEEP_VERSIONS, MIN_SHARE
from gen.curate import CurateConfig, check_run_dir, curate

log = logging.getLogger("gen.publish")

SHRINK_HINT = "--allow-shrink (or min_share_of_previous = 0 in the job file)"


class PublishRefused(Exception):
    """Publishing would lose or hide data; nothing was changed. Bad input: exit 2."""


class ShrunkByFailures(PublishRefused):
    """The shrink comes from captions that got no answer (a server down): not the input's
    fault, and no reason to allow a shrink; a retry publishes. Exit 3."""


def check_pointer(root: Path) -> None:
    """shards/latest must be capgen's symlink (or absent). A real folder there (a `cp -rL`
    copy) is the user's data: refused before anything is replaced, never deleted."""
    latest = root / "latest"
    if latest.exists() and not latest.is_symlink():
        raise PublishRefused(f"{latest} is a real {'folder' if latest.is_dir() else 'file'}, not the "
                             "symlink capgen moves to each new version (a copy?): nothing was changed; "
                             f"move it away (mv {latest} {latest}.copy) and rerun")


def check_share(what: str, previous: Optional[int], new: int, min_share: float, where: str) -> None:
    if previous and new < min_share * previous:
        raise PublishRefused(f"{new} {what}, under {min_share:.0%} of the {previous} of the previous "
                             f"publication ({where}): refused, the previous one is kept. If the shrink "
                             f"is expected, rerun with {SHRINK_HINT}")


def published_captions(out_dir: Path) -> Optional[int]:
    """Captions of the outputs in out_dir now: the manifest's count, else (a run stopped
    after its files were replaced) the rows of captions.parquet, a lower bound."""
    try:
        return int(json.loads((out_dir / "manifest.json").read_text())["counts"]["captions"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import pyarrow.parquet as pq
        return pq.ParquetFile(out_dir / "captions.parquet").metadata.num_rows
    except Exception:
        return None


def _latest_pairs(root: Path) -> Optional[int]:
    try:
        return int(json.loads((root / "latest" / "manifest.json").read_text())["stats"]["pairs_out"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def why_dropped(manifest: dict) -> str:
    """The drop reasons of dropped.parquet, the dominant first, for a log line about few or no
    pairs: what a person reads to see why."""
    reasons = sorted((manifest["stats"].get("dropped_by_reason") or {}).items(), key=lambda kv: -kv[1])
    if not reasons:
        return "there was no query record to curate"
    (reason, n), total = reasons[0], sum(v for _, v in reasons)
    rest = ", ".join(f"{r} {v}" for r, v in reasons[1:4])
    return f"{n} of {total} records dropped as {reason}" + (f" (then {rest})" if rest else "")


def _inputs_digest(run_dir: Path, config: CurateConfig) -> str:
    from gen.curate import judged   # polars and jieba: only once there is something to curate
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


def latest_version(run_dir: Path) -> tuple[str, str] | None:
    """(version, inputs digest) of shards/latest, or None when there is no version to reuse:
    none yet, not capgen's pointer (check_pointer refuses it), or its files damaged (a
    warning: a new version replaces it)."""
    latest = run_dir / "shards" / "latest"
    if not (latest.is_symlink() and (latest / "inputs.json").is_file() and (latest / "manifest.json").is_file()):
        return None
    try:
        digest = json.loads((latest / "inputs.json").read_text())["digest"]
        if not (isinstance(digest, str) and isinstance(json.loads((latest / "manifest.json").read_text()), dict)):
            raise ValueError("not the shape capgen writes")
        return os.readlink(latest), digest
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is damaged (inputs.json or manifest.json: %s): not reused, a new version replaces it",
                    latest, e, extra={"fields": {"event": "latest_damaged", "path": str(latest)}})
        return None


def reusable(run_dir: Path, config: CurateConfig) -> str | None:
    """The version a curation of the run's present files would reuse; None: it makes a new one.
    The rule prepare_version follows, and what --dry-run reports."""
    current = latest_version(run_dir)
    return current[0] if current and current[1] == _inputs_digest(run_dir, config) else None


def prune(root: Path, keep: int) -> None:
    """Keeps the newest `keep` versions, and always the one shards/latest points at. Runs
    after the new version is published: what cannot be deleted is a warning naming it, never
    a failed run (every later run would fail the same way, its outputs already out)."""
    current = os.readlink(root / "latest") if (root / "latest").is_symlink() else None
    try:
        versions = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0].isdigit())
    except OSError as e:
        log.warning("old shard versions not pruned: %s", e, extra={"fields": {"event": "prune_failed"}})
        return
    for old in versions[:-keep]:
        if old.name == current:
            continue
        left: list[str] = []
        shutil.rmtree(old, onerror=lambda _f, path, exc: left.append(f"{path}: {exc[1]}"))
        if left:
            log.warning("old shard version %s could not be deleted in full (%d left, first %s); "
                        "delete it by hand", old, len(left), left[0],
                        extra={"fields": {"event": "prune_failed", "version": str(old), "left": left[:10]}})


def _clear_partial(root: Path) -> None:
    """Folders of curations killed outright (kill -9), and pointers made for a swap a kill
    cut short (_point); the caller holds the run's lock."""
    for partial in root.glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    for pointer in root.glob(".latest.*"):
        if pointer.is_symlink() or pointer.is_file():
            pointer.unlink(missing_ok=True)


@dataclass
class Prepared:
    """A curated version ready to publish: place() gives its folder its name (no reader
    looks there yet), commit() also moves shards/latest to it; discard() removes it. Until
    commit() the previous version is what readers see."""
    root: Path
    version: str
    reused: bool
    manifest: dict
    partial: Optional[Path] = None

    def place(self) -> None:
        if self.partial is not None:
            os.replace(self.partial, self.root / self.version)
            self.partial = None

    def commit(self) -> None:
        self.place()
        _point(self.root / "latest", self.version)

    def discard(self) -> None:
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial = None

    def result(self) -> dict[str, Any]:
        return {"version": self.version, "reused": self.reused, **self.manifest}


def prepare_version(run_dir: Path, config: CurateConfig, root: Path, min_share: float = MIN_SHARE,
                    generation: Optional[dict] = None, failed: int = 0, name: Optional[Path] = None) -> Prepared:
    """Curates run_dir into a hidden folder under root (nothing a reader sees changes).
    Refused (PublishRefused) when shards/latest is not capgen's pointer, or the new version
    keeps less than min_share of the latest one's pairs (ShrunkByFailures when `failed`
    captions got no answer). generation: the run's manifest, for the dataset card
    (gen/publish/card.py); None reads run_dir/manifest.json. name: the run directory to name in
    messages, when run_dir is its staging copy."""
    check_run_dir(run_dir)
    check_pointer(root)
    root.mkdir(parents=True, exist_ok=True)
    _clear_partial(root)
    latest = root / "latest"
    digest = _inputs_digest(run_dir, config)
    current = latest_version(root.parent)
    if current and current[1] == digest:
        manifest = json.loads((latest / "manifest.json").read_text())
        return Prepared(root, current[0], True, manifest)
    version = base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + digest[:8]
    # Inputs back to an older version's within its second (A, B, A again): that folder is
    # not latest's and keeps its name; this one gets its own.
    for n in range(2, 1000):
        if not (root / version).exists():
            break
        version = f"{base}-{n}"
    partial = root / f".{version}.partial"
    try:
        manifest = curate(run_dir, config, out_dir=partial, name=name)
        write_card(partial, run_dir, config, manifest, generation, version)
        with atomic_path(partial / "inputs.json") as tmp:
            tmp.write_text(json.dumps({"digest": digest, "curation_fingerprint": config.fingerprint()}) + "\n")
        pairs = manifest["stats"]["pairs_out"]
        previous = _latest_pairs(root)
        if pairs < min_share * (previous or 0) and failed:
            raise ShrunkByFailures(f"curation kept {pairs} pairs, under {min_share:.0%} of the {previous} of "
                                   f"{latest}, and {failed} captions got no answer after every retry (a "
                                   f"server down?): nothing was published, shards/latest stays on "
                                   f"{os.readlink(latest)} and the previous outputs are kept; a rerun asks "
                                   "only for the captions without an answer")
        if pairs < min_share * (previous or 0):
            raise PublishRefused(f"curation kept {pairs} pairs, under {min_share:.0%} of the {previous} of "
                                 f"{latest} ({why_dropped(manifest)}): refused, shards/latest stays on "
                                 f"{os.readlink(latest)}. If that is expected, rerun with {SHRINK_HINT}")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if pairs == 0:
        log.warning("curation kept no pair: %s; every record with its reason in shards/%s/dropped.parquet%s",
                    why_dropped(manifest), version, f"; published over {previous} pairs as asked" if previous else "")
    return Prepared(root, version, False, manifest, partial)


def check_out(run_dir: Path, out: Path) -> None:
    """An --out folder must hold nothing of the run's: curating into the run directory
    replaces its manifest.json (gen.store prune then sees no answer in use), into an
    ancestor it scatters shards over the run's parents, and into shards/ it rewrites a
    published version in place (latest's: reused by every later run)."""
    run, dest = Path(run_dir).resolve(), Path(out).resolve()
    shards = run / "shards"
    if dest == run or dest in run.parents or dest == shards or shards in dest.parents:
        what = ("the run directory" if dest == run else "a folder holding the run directory"
                if dest in run.parents else f"inside {Path(run_dir) / 'shards'}, the run's published versions")
        raise PublishRefused(f"--out {out} is {what}: curating there would overwrite the run's own files; "
                             f"nothing was changed. Give a folder outside {run_dir}, or leave --out out "
                             "for a new version under shards/")


def curate_into(run_dir: Path, config: CurateConfig, out: Path) -> dict[str, Any]:
    """Curates run_dir into the folder `out` (gen.curate --out): made whole in out/.partial,
    then moved in by renames a stop signal waits for, the manifest last; curation files of
    an earlier curation there that this one does not rewrite go (write.py's _OWNED)."""
    from gen.curate.write import _OWNED
    check_run_dir(run_dir)
    check_out(run_dir, out)
    partial = out / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    published = False
    try:
        manifest = curate(run_dir, config, out_dir=partial)
        made = [p.relative_to(partial) for p in partial.rglob("*") if p.is_file() and p.name != "manifest.json"]
        with all_or_none():
            (out / "manifest.json").unlink(missing_ok=True)
            for rel in made:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial / rel, out / rel)
            for pattern in _OWNED:
                for stale in out.glob(pattern):
                    if stale.relative_to(out) not in made:
                        stale.unlink()
            os.replace(partial / "manifest.json", out / "manifest.json")
            published = True
    except BaseException as e:
        e.published = published
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def curate_versioned(run_dir: Path, config: CurateConfig, keep: int = KEEP_VERSIONS,
                     min_share: float = MIN_SHARE, generation: Optional[dict] = None) -> dict[str, Any]:
    """Curates run_dir into a new version under run_dir/shards and moves shards/latest to it
    (generation: as for prepare_version)."""
    root = Path(run_dir) / "shards"
    prepared = prepare_version(run_dir, config, root, min_share, generation)
    published = False
    try:
        with all_or_none():   # a stop signal waits for the folder's rename and the pointer's
            prepared.commit()
            published = True
    except BaseException as e:
        e.published = published   # which state a stop left, for the caller's last line
        raise
    finally:
        prepared.discard()
    prune(root, keep)
    return prepared.result()
