"""`--executor ray`: the generation stage on a Ray cluster, with Ray Data.

The driver (this process) reads the captions and skips what the answer store already has,
exactly as the local executor does; the rest goes to Ray Data in bounded windows, where a
pool of actors, each with its own engine, answers them; every outcome comes back to the
driver, which records it in the store the moment it arrives. So records, cache, resume and
outputs are the local run's, and a killed driver loses at most the window in flight.

Actors call OpenAI-compatible servers (`--base-url`, repeatable): on a cluster, run one vLLM
server per GPU node and list them all. Connects to `RAY_ADDRESS` when set (an existing
cluster), else starts a local Ray instance. ray is an optional extra: `pip install 'capgen[ray]'`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Union

from gen.config import RunConfig
from gen.generate import GenStats, Outcome, answer_caption, pending, record
from gen.store import AnswerStore
from schemas import Caption, Reject

log = logging.getLogger(__name__)

# Captions handed to Ray at a time: bounds the driver's memory, not the cluster's parallelism.
WINDOW = 4096
OUTCOME_FIELDS = [f.name for f in dataclasses.fields(Outcome)]


class ExecutorUnavailable(ValueError):
    """Ray is missing, or the settings ask for something this executor does not do."""


class Answerer:
    """A Ray Data actor: one engine, `concurrency` requests in flight per batch."""

    def __init__(self, config_json: str, model: str, schema: dict):
        from gen.engines import build_engine
        from gen.prompts import PromptSet
        self.config = RunConfig.model_validate_json(config_json)
        self.engine = build_engine(self.config, model, schema)
        self.prompts = PromptSet(self.config.prompts)
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        captions = [Caption(id=str(i), text=str(t)) for i, t in zip(batch["id"], batch["text"])]
        # Ray calls from a worker thread: drive our own loop, the one the engine's client lives on.
        outcomes = self.loop.run_until_complete(self._answer_all(captions, [str(k) for k in batch["key"]]))
        return {name: [getattr(o, name) for o in outcomes] for name in OUTCOME_FIELDS}

    async def _answer_all(self, captions: list[Caption], keys: list[str]) -> list[Outcome]:
        return await asyncio.gather(*(answer_caption(c, k, self.engine, self.prompts, self.config.repair_rounds)
                                      for c, k in zip(captions, keys)))


def generate_ray(records: Iterable[Union[Caption, Reject]], *, config: RunConfig, model: str,
                 schema: dict, store: AnswerStore, fingerprint: str,
                 on_progress: Callable[[GenStats], None] = lambda s: None) -> GenStats:
    if config.engine != "openai":
        raise ExecutorUnavailable("--executor ray drives OpenAI-compatible servers: give --base-url "
                         "(one vLLM server per GPU node)")
    try:
        import ray
    except ImportError as e:
        raise ExecutorUnavailable("--executor ray needs Ray: pip install 'capgen[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    stats = GenStats()
    # Each actor paces on its own: the key's limits are shared out between them.
    share = {k: max(1, getattr(config, k) // config.ray_actors) for k in ("rpm", "tpm") if getattr(config, k)}
    config_json = config.model_copy(update=share).model_dump_json()

    def run_window(rows: list[dict[str, str]]) -> None:
        ds = ray.data.from_items(rows).map_batches(
            Answerer, fn_constructor_kwargs={"config_json": config_json, "model": model, "schema": schema},
            batch_size=config.concurrency, compute=ray.data.ActorPoolStrategy(size=config.ray_actors),
            batch_format="numpy")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for values in zip(*(batch[name] for name in OUTCOME_FIELDS)):
                out = Outcome(**{n: (v.item() if hasattr(v, "item") else v)
                                 for n, v in zip(OUTCOME_FIELDS, values)})
                record(out, store, stats)
                on_progress(stats)

    window: list[dict[str, str]] = []
    in_flight: set[str] = set()  # the window's keys; all recorded once run_window returns
    for caption, key in pending(records, store, fingerprint, config.force, stats, on_progress, in_flight,
                                config.repair_rounds):
        window.append({"id": caption.id, "text": caption.text, "key": key})
        if len(window) >= WINDOW:
            run_window(window)
            window = []
            in_flight.clear()
    if window:
        run_window(window)
    return stats
