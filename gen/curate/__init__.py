"""Curation: generated query records -> training shards that trainers load directly.

The pipeline (gen/curate/pipeline.py) is imported only when called: it pulls in numba
(through bm25s), and numba's llvmlite loaded into a process that later starts vLLM's CPU
workers breaks them (vLLM's kernel dispatcher trips over llvmlite objects). gen.config needs
only CurateConfig, so importing capgen stays light and vLLM-safe.
"""
from __future__ import annotations

from pathlib import Path

from gen.curate.config import CurateConfig

__all__ = ["CurateConfig", "InputError", "check_run_dir", "curate"]

RUN_FILES = {"queries.parquet": ("caption_id", "query", "type", "subtype", "grade", "salience",
                                 "source", "model", "answer_key"),
             "captions.parquet": ("id", "text")}


class InputError(ValueError):
    """The run directory to curate is missing, not a directory, or holds a damaged file."""


def check_run_dir(run_dir: Path) -> None:
    """Before anything is created: a mistyped path must not leave folders behind, and a
    truncated parquet must be named, not surface as a reader's traceback halfway through."""
    import pyarrow.parquet as pq
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise InputError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is a file, not a run directory (the folder gen.run wrote, "
                         "with queries.parquet and captions.parquet)")
    for name, columns in RUN_FILES.items():
        path = run_dir / name
        if not path.is_file():
            raise InputError(f"{path} not found: is {run_dir} a gen.run output directory?")
        try:
            schema = pq.read_schema(path)
        except Exception as e:  # pyarrow's errors for a bad file are of several types
            raise InputError(f"{path} is not a readable parquet file (truncated or damaged?): {e}") from None
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise InputError(f"{path} lacks the column(s) {', '.join(missing)}: not a gen.run output")


def curate(*args, **kwargs) -> dict:
    from gen.curate.pipeline import curate as run
    return run(*args, **kwargs)


curate.__doc__ = "curate(run_dir, config=None, out_dir=None) -> manifest dict; see gen.curate.pipeline."
