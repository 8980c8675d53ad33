"""Any OpenAI-compatible server (vLLM's, llama.cpp's, a hosted API) through the official client.

Servers differ in what they accept, so the request starts with the strongest options and
steps down, once for the whole run, when the server refuses one by name (HTTP 400):
  response_format json_schema -> json_object -> none (the prompt still describes the JSON);
  chat_template_kwargs {enable_thinking: false} (Qwen3 and other thinking models) -> dropped.
The API key comes from the environment and is handed to the client only: never logged.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Optional

import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from gen.config import Sampling
from gen.engines.base import Completion, Engine, EngineError
from gen.engines.pool import Server, ServerPool
from gen.engines.retry import EmptyAnswer, RetryPolicy, is_transient

log = logging.getLogger(__name__)

FORMATS = ("json_schema", "json_object", "none")


def _refuses(exc: openai.BadRequestError, *names: str) -> bool:
    text = f"{exc.message} {getattr(exc, 'param', '') or ''} {exc.body or ''}".lower()
    return any(n in text for n in names)


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, *, base_urls: list[Optional[str]], model: str, schema: dict, sampling: Sampling,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), disable_thinking: bool = True,
                 cooldown: float = 30.0):
        self.model, self.schema, self.sampling, self.retry = model, schema, sampling, retry
        # Local servers need no key; the client insists on one, so a placeholder stands in.
        api_key = os.environ.get(api_key_env) or "EMPTY"
        self._secret = api_key if api_key != "EMPTY" else None
        # None: the client's own default (OPENAI_BASE_URL, else the OpenAI API).
        self.pool = ServerPool([
            Server(url=url or "default", client=openai.AsyncOpenAI(
                base_url=url, api_key=api_key, timeout=timeout, max_retries=0))  # tenacity retries
            for url in (base_urls or [None])], cooldown=cooldown)
        self.format_level = 0
        self.thinking_kwargs = disable_thinking
        self.attempts = 0
        self.retries = 0
        self._downgrade = asyncio.Lock()

    def _request(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=self.model, messages=messages, temperature=self.sampling.temperature,
            top_p=self.sampling.top_p, max_tokens=self.sampling.max_tokens, seed=self.sampling.seed,
        )
        fmt = FORMATS[self.format_level]
        if fmt == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "caption_queries", "schema": self.schema, "strict": True}}
        elif fmt == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        if self.thinking_kwargs:
            kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
        return kwargs

    async def _step_down(self, exc: openai.BadRequestError, level: int, thinking: bool) -> bool:
        """Drop the option the server refused; False when there is nothing left to drop."""
        async with self._downgrade:
            if (level, thinking) != (self.format_level, self.thinking_kwargs):
                return True  # another request already stepped down; just try again
            if thinking and _refuses(exc, "chat_template_kwargs", "enable_thinking"):
                self.thinking_kwargs = False
            elif level + 1 < len(FORMATS) and _refuses(exc, "response_format", "json_schema", "json_object", "structured"):
                self.format_level = level + 1
            else:
                return False
            log.warning("server refused an option (%s); continuing with response_format=%s, "
                        "thinking kwargs %s", self.redact(exc.message), FORMATS[self.format_level],
                        "on" if self.thinking_kwargs else "off")
            return True

    async def _once(self, messages: list[dict[str, str]]) -> Completion:
        server = self.pool.pick()
        self.pool.started(server)
        ok = False
        try:
            while True:
                level, thinking = self.format_level, self.thinking_kwargs
                self.attempts += 1
                try:
                    resp = await server.client.chat.completions.create(**self._request(messages))
                    break
                except openai.BadRequestError as exc:
                    if not await self._step_down(exc, level, thinking):
                        raise
            ok = bool(resp.choices)
        except BaseException as exc:
            # Only the server's own trouble counts against it, not a request it rightly refused.
            ok = not is_transient(exc)
            raise
        finally:
            self.pool.finished(server, ok)
        if not resp.choices:
            raise EmptyAnswer("server answered 200 with no choices")
        choice = resp.choices[0]
        msg = choice.message
        extra = msg.model_extra or {}
        # Thinking models behind some servers put the whole answer in the reasoning field.
        text = msg.content or extra.get("reasoning_content") or extra.get("reasoning") or ""
        usage = resp.usage
        return Completion(
            text=text,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            refusal=getattr(msg, "refusal", None),
            finish_reason=choice.finish_reason,
        )

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.retry.max_attempts),
                wait=self.retry.wait,
                retry=retry_if_exception(is_transient),
                reraise=True,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.retries += 1
                    return await self._once(messages)
        except (openai.OpenAIError, EmptyAnswer) as exc:
            # The client's messages carry no key; keep only the class and status for the record.
            status = getattr(exc, "status_code", None)
            detail = self.redact(getattr(exc, "message", str(exc)))[:300]
            raise EngineError(f"{type(exc).__name__}{f' {status}' if status else ''}: {detail}") from None
        raise AssertionError("unreachable")

    def redact(self, text: str) -> str:
        """Some servers echo the key in a 401 message; it must not reach logs or rejects."""
        return text.replace(self._secret, "***") if self._secret else text

    async def aclose(self) -> None:
        for server in self.pool.servers:
            await server.client.close()

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "servers": self.pool.describe(),
                "response_format": FORMATS[self.format_level],
                "thinking_kwargs": self.thinking_kwargs,
                "attempts": self.attempts, "retries": self.retries}
