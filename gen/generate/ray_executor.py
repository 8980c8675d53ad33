"""`--executor ray`: the generation stage on a Ray cluster, one engine per Ray actor.

The driver (this process) reads the captions and skips what the answer store already has,
exactly as the local executor does; the rest goes out in batches to a fixed pool of actors
(`--ray-actors`), each holding the engine a local run would build (gen.engines.build_engine):
an in-process vLLM engine on its own GPUs (`--engine vllm`), or a client of OpenAI-compatible
servers (`--base-url`). Each actor answers a caption as the local run does (prompts,
decoding constraint, repair rounds: gen.generate.answer_caption) and sends the outcomes back;
the driver records each batch in the store the moment it arrives. So records, cache, resume
and outputs are the local run's, and a killed driver loses at most the batches in flight.

Why not `ray.data.llm`: its processor makes one request per row, through a chat template
and a fixed sampling stage. A caption here is a conversation decided by the driver's code:
an answer that fails pydantic validation is asked again with its error (a repair round), so
a second request depends on the first's validation, and a short caption carries its own
schema. Expressing that with ray.data.llm takes one processor (one set of engines) per round,
and its vLLM stage is not the engine the local run uses. docs/ray.md has the details.

Connects to `RAY_ADDRESS` when set (an existing cluster), else starts a local Ray instance.
ray is an optional extra: `pip install 'capgen[ray]'`.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from gen.atomic import init_ray_keeping_stop_handlers
from gen.config import RunConfig
from gen.engines import EngineUnusable, build_engine
from gen.engines.base import EngineError
from gen.generate import GenStats, Outcome, answer_caption, pending, record
from gen.store import AnswerStore
from schemas import Caption, Reject

log = logging.getLogger(__name__)

# Batches each actor holds at once: the second is queued in its engine while the first's last
# answers (repair rounds, stragglers) finish, so a GPU does not idle between batches.
BATCHES_PER_ACTOR = 2
STOPPED = "stopped"   # an actor's engine can answer nothing: EngineUnusable, on the driver
# ray.wait blocks in Ray's C++ core, where a stop signal's Python handler cannot run: waits
# are this long at most, so a SIGTERM stops the run (and its engines) within a second or so.
WAIT_S = 1.0
# Tries of one batch on actors that died under it; a batch that kills this many is most
# likely what kills them, and its captions end without answer (a rerun asks again).
BATCH_TRIES = 2


class ExecutorUnavailable(ValueError):
    """Ray is missing, or the settings ask for something this cluster cannot give."""


class ReplicaLost(EngineError):
    """Every actor died: the run stops; what was recorded stays, a rerun asks for the rest."""


def _node() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only for a message
        return socket.gethostname()


def model_path(model: str) -> Optional[str]:
    """`model` as an absolute path when it names a directory (on this machine, or an absolute
    path meant for the cluster's nodes); None for a model hub name."""
    path = Path(model).expanduser()
    if path.is_absolute() or path.exists() or model.startswith("."):
        return str(path.resolve())
    return None


class Replica:
    """An actor's body: one engine, answering batches of captions as the local run does."""

    def __init__(self, config_json: str, model: str, schema: dict, path: Optional[str], build: Callable):
        self.config = RunConfig.model_validate_json(config_json)
        self.model, self.schema, self.path = model, schema, path
        self.build = build
        self.engine = None

    async def start(self) -> dict[str, Any]:
        """Build the engine: {"node": ip} when it is up, {"node": ip, "error": why} when not.
        An error is data, not an exception, so the driver can name the node in its message."""
        node = _node()
        if self.path is not None and not Path(self.path).is_dir():
            return {"node": node, "error": f"the model directory {self.path} does not exist on node {node}"}
        from gen.generate.prompts import PromptSet
        try:
            self.prompts = PromptSet(self.config.prompts)
            self.engine = await asyncio.to_thread(self.build, self.config, self.model, self.schema)
        except Exception as e:  # noqa: BLE001 - reported to the driver with the node
            return {"node": node, "error": f"{type(e).__name__}: {e}"}
        return {"node": node, "engine": self.engine.describe().get("engine")}

    async def answer(self, rows: list[tuple[str, str, str]]) -> list[Outcome]:
        tasks = [asyncio.ensure_future(answer_caption(Caption(id=i, text=t), k, self.engine, self.prompts,
                                                      self.config.repair_rounds)) for i, t, k in rows]
        try:
            return list(await asyncio.gather(*tasks))
        except EngineUnusable as e:
            # Raised here, it would reach the driver as Ray's traceback; as outcomes it reaches
            # the driver whole, which stops the run as the local executor does.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return [Outcome(key=k, caption_id=i, status=STOPPED, answer=None, raw=None, reason=str(e),
                            requests=0, prompt_tokens=0, completion_tokens=0) for i, _, k in rows]

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()

    def describe(self) -> dict[str, Any]:
        return self.engine.describe() if self.engine is not None else {}


def gpus_per_actor(config: RunConfig, cluster_gpus: float) -> float:
    """The GPUs one actor asks Ray for: the setting when given; else for vLLM its tensor x
    pipeline parallel size when the cluster has GPUs, 0 when it has none (the CPU build)."""
    if config.ray_gpus_per_actor is not None:
        return float(config.ray_gpus_per_actor)
    if config.engine != "vllm" or cluster_gpus == 0:
        return 0.0
    args = config.vllm_args
    return float(int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1)))


def check_fit(nodes: list[tuple[str, dict[str, float]]], actors: int, gpus: float, cpus: float) -> None:
    """Refuse, before scheduling anything, a pool the cluster can never hold: Ray would wait
    for the resources forever. `nodes`: (address, total resources) of each live node. An
    actor's GPUs must all be on one node (vLLM's tensor parallel group shares a node)."""
    free = {addr: dict(res) for addr, res in nodes}
    placed = 0
    for _ in range(actors):
        fits = [a for a, r in free.items() if r.get("GPU", 0) >= gpus and r.get("CPU", 0) >= cpus]
        if not fits:
            break
        # the node with the most GPUs left: keeps whole nodes for actors that need several
        best = max(fits, key=lambda a: (free[a].get("GPU", 0), free[a].get("CPU", 0)))
        free[best]["GPU"] = free[best].get("GPU", 0) - gpus
        free[best]["CPU"] = free[best].get("CPU", 0) - cpus
        placed += 1
    if placed == actors:
        return
    have = ", ".join(f"{a}: {_n(r.get('GPU', 0))} GPU, {_n(r.get('CPU', 0))} CPU" for a, r in nodes) or "no node"
    if gpus and not any(r.get("GPU", 0) for _, r in nodes):
        raise ExecutorUnavailable(
            f"--ray-gpus-per-actor {_n(gpus)}: the Ray cluster has no GPU ({have}); add GPU nodes, "
            "or set --ray-gpus-per-actor 0 to run vLLM's CPU build")
    if gpus and not any(r.get("GPU", 0) >= gpus for _, r in nodes):
        raise ExecutorUnavailable(
            f"--ray-gpus-per-actor {_n(gpus)} (tensor_parallel_size x pipeline_parallel_size): no node of "
            f"the Ray cluster has {_n(gpus)} GPUs ({have}); an actor's GPUs must be on one node: lower "
            "tensor_parallel_size (--vllm-arg) or --ray-gpus-per-actor")
    raise ExecutorUnavailable(
        f"--ray-actors {actors} with {_n(gpus)} GPU and {_n(cpus)} CPU each: the Ray cluster holds only "
        f"{placed} ({have}); lower --ray-actors or add nodes")


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass
class _Batch:
    rows: list[tuple[str, str, str]]     # (caption id, text, key)
    tries: int = 0
    errors: list[str] = field(default_factory=list)


def _dead(ray, exc: BaseException) -> bool:
    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def generate_ray(records: Iterable[Union[Caption, Reject]], *, config: RunConfig, model: str,
                 schema: dict, store: AnswerStore, fingerprint: str,
                 on_progress: Callable[[GenStats], None] = lambda s: None,
                 build: Optional[Callable] = None, describe: Optional[dict] = None) -> GenStats:
    """`build(config, model, schema) -> Engine` in each actor (default gen.engines.build_engine).
    `describe`, when given, receives an actor's engine description for the manifest."""
    if config.engine == "openai" and not config.base_urls:
        raise ExecutorUnavailable("--engine openai needs --base-url (one or more servers)")
    try:
        import ray
    except ImportError as e:
        raise ExecutorUnavailable("--executor ray needs Ray: pip install 'capgen[ray]'") from e
    if not ray.is_initialized():
        init_ray_keeping_stop_handlers(ray)
    nodes = [(n.get("NodeManagerAddress", n["NodeID"]), n.get("Resources", {}))
             for n in ray.nodes() if n.get("Alive")]
    gpus = gpus_per_actor(config, sum(r.get("GPU", 0) for _, r in nodes))
    cpus = 1.0
    check_fit(nodes, config.ray_actors, gpus, cpus)
    # A server's model name may look like a path on its own machine: only vLLM's is loaded here.
    path = model_path(model) if config.engine == "vllm" else None
    log.info("starting %d Ray actor(s), %s GPU each, engine %s", config.ray_actors, _n(gpus), config.engine,
             extra={"fields": {"event": "ray_actors", "actors": config.ray_actors, "gpus_per_actor": gpus}})

    # Two batches at each actor. vLLM's engine takes `concurrency` at once, as in a local run,
    # and the second batch waits inside it for the first one's slots: full batches, and no
    # gap between them. A server engine sends every caption it holds, so there the two make
    # `concurrency` together: a local run's requests in flight.
    batch_size = config.concurrency if config.engine == "vllm" else max(1, config.concurrency // BATCHES_PER_ACTOR)
    Actor = ray.remote(Replica).options(num_gpus=gpus, num_cpus=cpus, max_restarts=0, max_task_retries=0,
                                        max_concurrency=BATCHES_PER_ACTOR + 2)
    # Each actor paces on its own: the key's limits are shared out between them.
    share = {k: max(1, getattr(config, k) // config.ray_actors) for k in ("rpm", "tpm") if getattr(config, k)}
    config_json = config.model_copy(update=share).model_dump_json()
    actors = [Actor.remote(config_json, model, schema, path, build or build_engine) for _ in range(config.ray_actors)]
    stats = GenStats()
    try:
        live = _start(ray, actors)
        _feed(ray, live, records, config, store, fingerprint, stats, on_progress, batch_size)
        if describe is not None:
            describe.update(_described(ray, live))
    finally:
        _stop(ray, actors)
    return stats


def _described(ray, actors: list) -> dict:
    for actor in actors:   # the first one still alive
        try:
            return ray.get(actor.describe.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - dead: ask the next
            continue
    return {}


def _start(ray, actors: list) -> list:
    """Wait for every actor's engine; the first that cannot start stops the run, naming its node."""
    refs = {a.start.remote(): a for a in actors}
    live = []
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1, timeout=WAIT_S)
        if not done:
            continue
        actor = refs.pop(done[0])
        try:
            info = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - an actor that died starting
            raise ReplicaLost(f"a Ray actor died while starting its engine: {_first(e, 2)}") from None
        if "error" in info:
            if "does not exist on node" in info["error"]:
                raise ExecutorUnavailable(
                    f"{info['error']}: every node that hosts an actor needs the model at the same path; "
                    "copy it there or onto storage every node mounts, or set --model to a name the "
                    "nodes can download")
            raise EngineError(f"the engine did not start on node {info['node']}: {info['error']}")
        log.info("engine up on node %s", info["node"], extra={"fields": {"event": "ray_actor_up", "node": info["node"]}})
        live.append(actor)
    return live


def _first(error: BaseException, lines: int = 1) -> str:
    """Ray's errors run to dozens of lines (memory tables, worker ids): the lines that say why."""
    return " ".join(str(error).strip().splitlines()[:lines])


def _feed(ray, live: list, records, config: RunConfig, store: AnswerStore, fingerprint: str,
          stats: GenStats, on_progress, batch_size: int) -> None:
    in_flight_keys: set[str] = set()   # keys sent and not yet recorded: duplicates wait on them
    todo = pending(records, store, fingerprint, config.force, stats, on_progress, in_flight_keys,
                   config.repair_rounds)
    retry: deque[_Batch] = deque()
    load = {a: 0 for a in live}
    refs: dict[Any, tuple[Any, _Batch]] = {}
    exhausted = False

    def next_batch() -> Optional[_Batch]:
        nonlocal exhausted
        if retry:
            return retry.popleft()
        if exhausted:
            return None
        rows = []
        for caption, key in todo:
            rows.append((caption.id, caption.text, key))
            if len(rows) == batch_size:
                break
        else:
            exhausted = True
        return _Batch(rows) if rows else None

    def finish(batch: _Batch, outcomes: list[Outcome]) -> None:
        for out in outcomes:
            if out.status == STOPPED:
                raise EngineUnusable(out.reason)
            record(out, store, stats)
            in_flight_keys.discard(out.key)
        on_progress(stats)

    while True:
        for level in range(BATCHES_PER_ACTOR):   # every actor its first batch before any its second
            for actor in [a for a in load if load[a] <= level]:
                batch = next_batch()
                if batch is None:
                    break
                refs[actor.answer.remote(batch.rows)] = (actor, batch)
                load[actor] += 1
        if not refs:
            return
        done, _ = ray.wait(list(refs), num_returns=1, timeout=WAIT_S)
        if not done:
            continue
        actor, batch = refs.pop(done[0])
        try:
            outcomes = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - sorted below: a dead actor or a bug
            if not _dead(ray, e):
                raise
            _lost(actor, load, batch, e, retry, finish)
            if not load:
                raise ReplicaLost(f"every Ray actor died (the last: {_first(e)}); the answers "
                                  "recorded so far are kept and a rerun asks only for the rest") from None
            continue
        load[actor] -= 1
        finish(batch, outcomes)


def _lost(actor, load: dict, batch: _Batch, error: BaseException, retry: deque, finish) -> None:
    """An actor died under `batch`: the actor leaves the pool; the batch is asked again on
    another, or, having killed BATCH_TRIES of them, ends without answers (a rerun asks again)."""
    if actor in load:
        del load[actor]
        log.warning("a Ray actor died (%s); %d left; its batches go to the others", _first(error),
                    len(load), extra={"fields": {"event": "ray_actor_lost", "actors_left": len(load)}})
    batch.tries += 1
    batch.errors.append(_first(error))
    if batch.tries < BATCH_TRIES:
        retry.append(batch)
        return
    reason = f"the Ray actors answering it died {batch.tries} times ({batch.errors[-1]})"
    finish(batch, [Outcome(key=k, caption_id=i, status="failed", answer=None, raw=None, reason=reason,
                           requests=0, prompt_tokens=0, completion_tokens=0) for i, _, k in batch.rows])


def _stop(ray, actors: list) -> None:
    """End the engines (vLLM's processes) and then the actors, also after a failure."""
    try:
        ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=10)
    except Exception:  # noqa: BLE001 - a dead actor cannot close; it is killed below anyway
        pass
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001
            pass
