"""The OpenAI-compatible engine against injected faults: retry what is transient, step down
what the server refuses, and find the answer wherever the server put it."""
import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import pytest
from fake_openai import FakeOpenAI

from gen.config import Sampling
from gen.engines import EngineError, RetryPolicy
from gen.engines.openai import OpenAIEngine
from gen.validate import parse_answer
from schemas import answer_json_schema

CAPTION = "图片中显示了一个安装在墙上的燃气表，旁边有管道和电源适配器。"
MESSAGES = [{"role": "system", "content": "说明"}, {"role": "user", "content": f"描述：{CAPTION}\n输出："}]


def complete(fake, n=1, timeout=5.0, attempts=4, **kw):
    async def go():
        engine = OpenAIEngine(base_urls=[fake.base_url], model="fake-model", schema=answer_json_schema(),
                              sampling=Sampling(), timeout=timeout,
                              retry=RetryPolicy(max_attempts=attempts, initial=0.01), **kw)
        try:
            results = await asyncio.gather(*(engine.complete(MESSAGES) for _ in range(n)))
            return results, engine.describe()
        finally:
            await engine.aclose()
    return asyncio.run(go())


def script(*names):
    """Fault by arrival order: the i-th request gets names[i], then none."""
    return lambda i, caption: names[i] if i < len(names) else None


@pytest.mark.parametrize("fault", ["429", "500", "502", "503", "drop", "empty_choices", "timeout"])
def test_transient_faults_are_retried_until_an_answer(fault):
    with FakeOpenAI(faults=script(fault, fault), hang_seconds=5) as fake:
        (done,), info = complete(fake, timeout=0.5)
        assert len(fake.requests) == 3
    assert parse_answer(done.text, CAPTION).entities
    assert info["retries"] == 2


def test_retries_are_bounded_and_end_in_engine_error():
    with FakeOpenAI(faults={"500": 1.0}) as fake:
        with pytest.raises(EngineError, match="InternalServerError 500"):
            complete(fake, attempts=3)
        assert len(fake.requests) == 3


def test_other_4xx_is_not_retried():
    # A 404 (wrong URL) says the request itself is wrong: retrying would only repeat it.
    with FakeOpenAI() as fake:
        fake.base_url = fake.base_url.replace("/v1", "/wrong")
        with pytest.raises(EngineError, match="NotFoundError 404"):
            complete(fake, attempts=5)
        assert fake.requests == []


def test_retry_after_header_is_honoured_and_capped():
    policy = RetryPolicy(initial=0.01, retry_after_cap=60)

    def state(headers):
        resp = httpx.Response(429, headers=headers, request=httpx.Request("POST", "http://x"))
        exc = openai.RateLimitError("slow down", response=resp, body=None)
        return SimpleNamespace(outcome=SimpleNamespace(exception=lambda: exc), attempt_number=1)

    assert policy.wait(state({"retry-after": "7"})) == 7
    assert policy.wait(state({"retry-after-ms": "250"})) == 0.25
    assert policy.wait(state({"retry-after": "99999"})) == 60
    assert policy.wait(state({})) <= 0.01  # no header: jittered backoff


def test_json_schema_refused_falls_back_to_json_object_for_the_whole_run():
    with FakeOpenAI(reject_json_schema=True) as fake:
        results, info = complete(fake, n=5)
        formats = [r.get("response_format", {}).get("type") for r in fake.requests]
    assert all(parse_answer(r.text, CAPTION) for r in results)
    assert info["response_format"] == "json_object"
    assert formats.count("json_schema") >= 1 and formats[-1] == "json_object"
    assert formats.count("json_schema") <= 5 and len(formats) - formats.count("json_schema") == 5


def test_chat_template_kwargs_refused_are_dropped():
    with FakeOpenAI(reject_chat_template_kwargs=True) as fake:
        (done,), info = complete(fake)
        assert "chat_template_kwargs" not in fake.requests[-1]
    assert info["thinking_kwargs"] is False and parse_answer(done.text, CAPTION)


def test_thinking_off_can_be_disabled():
    with FakeOpenAI() as fake:
        complete(fake, disable_thinking=False)
        assert "chat_template_kwargs" not in fake.requests[0]


@pytest.mark.parametrize("fault", ["reasoning_only", "think_wrapped", "fenced"])
def test_answer_found_wherever_the_server_puts_it(fault):
    with FakeOpenAI(faults={fault: 1.0}) as fake:
        (done,), _ = complete(fake)
    assert parse_answer(done.text, CAPTION).summaries


def test_refusal_and_broken_content_reach_validation_not_retry():
    for fault in ("refusal", "truncated", "wrong_shape"):
        with FakeOpenAI(faults={fault: 1.0}) as fake:
            (done,), info = complete(fake)
            assert len(fake.requests) == 1 and info["retries"] == 0
        if fault == "refusal":
            assert done.text == "" and done.refusal
