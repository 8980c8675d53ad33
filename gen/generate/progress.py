"""Progress for people (a bar) and for schedulers (a JSON log line every few seconds)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from gen.input.captions import BROKEN, input_format, open_lines
from gen.generate import GenStats

log = logging.getLogger("gen.generate.progress")


def count_lines(path: Path) -> Optional[int]:
    """A total for the bar; counts newlines in blocks, never holds the file."""
    kind = input_format(path)
    if kind == "parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    n = 0
    try:
        with open_lines(path, kind) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                n += block.count(b"\n")
    except BROKEN:  # the reader says where, as a reject; the bar just has no total
        return None
    return n


class Progress:
    def __init__(self, total: Optional[int], bar: bool, every: float = 10.0):
        self.every, self.last = every, 0.0
        self.total, self.started = total, time.monotonic()
        self.bar = None
        if bar:
            from tqdm import tqdm

            from gen.logs import console
            self.bar = tqdm(total=total, unit="cap", dynamic_ncols=True, smoothing=0.05, file=console())
        self.done = 0

    def __call__(self, s: GenStats) -> None:
        done = s.cached + s.accepted + s.rejected + s.failed + s.input_rejects
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(ok=s.accepted, cached=s.cached, rej=s.rejected, err=s.failed,
                                 tok=s.prompt_tokens + s.completion_tokens, refresh=False)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            elapsed = self.last - self.started
            fields = {"done": done, "total": self.total, "accepted": s.accepted, "cached": s.cached,
                      "rejected": s.rejected, "failed": s.failed, "tokens": s.prompt_tokens + s.completion_tokens,
                      "elapsed_s": round(elapsed, 1), "per_s": round(done / elapsed, 2) if elapsed > 0 else None}
            log.info("progress: %s", " ".join(f"{k}={v}" for k, v in fields.items()),
                     extra={"fields": {"event": "progress", **fields}})
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
