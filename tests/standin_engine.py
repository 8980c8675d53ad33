"""An Engine answering in-process as tests/fake_openai.py does, for Ray actors in tests.

It stands in for the vLLM engine where a test is about the Ray executor, not the model:
each request's caption is appended to `asked` (a file: actors are other processes) and the
pid of the process answering it to `asked` with the suffix .pids; a caption
containing `die_on` ends its process abruptly (os._exit) a second after it was asked, up to
`die_times` times in all, as a replica lost mid-batch would.
"""
from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Optional

from fake_openai import _caption_of, _tokens, default_answer

from gen.engines.base import Completion, Engine


class StandInEngine(Engine):
    name = "stand-in"

    def __init__(self, asked: Path, die_on: Optional[str] = None, die_times: int = 0):
        self.asked, self.die_on, self.die_times = Path(asked), die_on, die_times

    async def complete(self, messages, schema=None) -> Completion:
        caption = _caption_of({"messages": messages})
        with self.asked.open("a", encoding="utf-8") as f:
            f.write(caption.replace("\n", " ") + "\n")
        with self.asked.with_suffix(".pids").open("a") as f:
            f.write(f"{os.getpid()}\n")
        if self.die_on and self.die_on in caption:
            deaths = self.asked.with_suffix(".deaths")
            died = len(deaths.read_text().splitlines()) if deaths.exists() else 0
            if died < self.die_times:
                with deaths.open("a") as f:
                    f.write(f"{os.getpid()}\n")
                # mid-generation: the actor's other batch has time to come back first
                await asyncio.sleep(1)
                os._exit(1)
        text = default_answer(caption)
        return Completion(text=text, prompt_tokens=sum(_tokens(m["content"]) for m in messages),
                          completion_tokens=_tokens(text), finish_reason="stop")

    def describe(self) -> dict:
        return {"engine": self.name}


def _build(config, model, schema, **kwargs) -> StandInEngine:
    return StandInEngine(**kwargs)


def builder(asked: Path, die_on: Optional[str] = None, die_times: int = 0):
    """A `build(config, model, schema)` for gen.generate.ray_executor.generate_ray."""
    return functools.partial(_build, asked=str(asked), die_on=die_on, die_times=die_times)
