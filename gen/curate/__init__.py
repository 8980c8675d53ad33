"""Curation: generated query records -> training shards that trainers load directly.

The pipeline (gen/curate/pipeline.py) is imported only when called: it pulls in numba
(through bm25s), and numba's llvmlite loaded into a process that later starts vLLM's CPU
workers breaks them (vLLM's kernel dispatcher trips over llvmlite objects). gen.config needs
only CurateConfig, so importing capgen stays light and vLLM-safe.
"""
from __future__ import annotations

from gen.curate.config import CurateConfig

__all__ = ["CurateConfig", "curate"]


def curate(*args, **kwargs) -> dict:
    from gen.curate.pipeline import curate as run
    return run(*args, **kwargs)


curate.__doc__ = "curate(run_dir, config=None, out_dir=None) -> manifest dict; see gen.curate.pipeline."
