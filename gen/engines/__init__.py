"""Engines turn chat messages into completions; `build_engine` picks one from the config."""
from __future__ import annotations

from gen.config import RunConfig
from gen.engines.base import Completion, Engine, EngineError, EngineUnusable
from gen.engines.retry import RetryPolicy


def build_engine(config: RunConfig, model: str, schema: dict) -> Engine:
    """`model` is the resolved name or path (the config may hold an alias)."""
    if config.engine == "openai":
        from gen.engines.openai import OpenAIEngine
        from gen.engines.pacing import Pacer
        return OpenAIEngine(
            base_urls=list(config.base_urls), model=model, schema=schema, sampling=config.sampling,
            api_key_env=config.api_key_env, timeout=config.timeout,
            retry=RetryPolicy(max_attempts=config.max_attempts, initial=config.retry_wait),
            disable_thinking=config.disable_thinking,
            pacer=Pacer(config.rpm, config.tpm, config.rate_window))
    from gen.engines.vllm import VLLMEngine
    return VLLMEngine(model=model, schema=schema, sampling=config.sampling,
                      max_in_flight=config.concurrency, max_model_len=config.max_model_len,
                      disable_thinking=config.disable_thinking, **config.vllm_args)


__all__ = ["Completion", "Engine", "EngineError", "EngineUnusable", "RetryPolicy", "build_engine"]
