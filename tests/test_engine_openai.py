"""The OpenAI-compatible engine against injected faults: retry what is transient, step down
what the server refuses, and find the answer wherever the server put it."""
import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from fake_openai import FakeOpenAI

from gen.config import Sampling
from gen.engines import EngineError, EngineUnusable, RetryPolicy
from gen.engines.openai import OpenAIEngine
from gen.engines.retry import StatusError
from gen.generate.validate import parse_answer
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
        with pytest.raises(EngineError, match="HTTP 500 Internal Server Error"):
            complete(fake, attempts=3)
        assert len(fake.requests) == 3


def test_other_4xx_is_not_retried():
    # A 404 (wrong URL) is wrong for every request: retrying would only repeat it, and with no
    # other server to ask, nothing can be answered (tests/test_stops.py).
    with FakeOpenAI() as fake:
        fake.base_url = fake.base_url.replace("/v1", "/wrong")
        with pytest.raises(EngineUnusable, match="HTTP 404 Not Found: no route POST"):
            complete(fake, attempts=5)
        assert fake.requests == []


def test_retry_after_header_is_honoured_and_capped():
    policy = RetryPolicy(initial=0.01, retry_after_cap=60)

    def state(headers):
        exc = StatusError(429, headers, '{"error": {"message": "slow down"}}')
        return SimpleNamespace(outcome=SimpleNamespace(exception=lambda: exc), attempt_number=1)

    assert policy.wait(state({"Retry-After": "7"})) == 7
    assert policy.wait(state({"retry-after-ms": "250"})) == 0.25
    assert policy.wait(state({"retry-after": "99999"})) == 60
    assert policy.wait(state({})) <= 0.01  # no header: jittered backoff


@pytest.mark.parametrize("headers", [{"retry-after-ms": "nan"}, {"retry-after": "NaN"},
                                     {"retry-after": "1 Jan 99999999999 00:00 GMT"},
                                     {"retry-after": "Mon, 01 Jan 2024 99999999999:00:00 GMT"}])
def test_a_retry_after_that_is_no_number_of_seconds_leaves_the_wait_to_the_backoff(headers):
    # NaN passes min() caps (min(nan, 60) is nan); a date past datetime's range overflows.
    policy = RetryPolicy(initial=0.01, retry_after_cap=60)
    exc = StatusError(429, headers, '{"error": {"message": "slow down"}}')
    state = SimpleNamespace(outcome=SimpleNamespace(exception=lambda: exc), attempt_number=1)
    assert 0 <= policy.wait(state) <= 0.01


def test_a_negative_retry_after_is_no_wait_at_all():
    policy = RetryPolicy(initial=5, retry_after_cap=60)
    for headers in ({"retry-after-ms": "-5000000"}, {"retry-after": "-3"}):
        exc = StatusError(503, headers, "")
        assert policy.wait(SimpleNamespace(outcome=SimpleNamespace(exception=lambda: exc), attempt_number=1)) == 0


def test_an_error_body_nested_past_the_stack_is_its_own_message():
    body = "[" * 100_000
    assert str(StatusError(500, {}, body)).endswith(body)


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


def test_broken_content_reaches_validation_not_retry():
    # Refusals and empty answers are retried instead: tests/test_hostile_replies.py.
    for fault in ("truncated", "wrong_shape"):
        with FakeOpenAI(faults={fault: 1.0}) as fake:
            (done,), info = complete(fake)
            assert len(fake.requests) == 1 and info["retries"] == 0


def test_request_body_and_auth_header_are_the_chat_completions_api(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAI() as fake:
        (done,), _ = complete(fake)
        body, auth = fake.requests[0], fake.auth_headers[0]
    assert auth == "Bearer EMPTY"  # local servers need no key; vLLM's docs use this placeholder
    assert set(body) == {"model", "messages", "temperature", "top_p", "max_tokens", "seed",
                         "response_format", "chat_template_kwargs"}
    sampling = Sampling()
    assert (body["model"], body["messages"]) == ("fake-model", MESSAGES)
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == \
        (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.seed)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "caption_queries", "schema": answer_json_schema(), "strict": True}}
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert done.finish_reason == "stop" and done.prompt_tokens > 0 and done.completion_tokens > 0


class Scripted:
    """A server whose every reply comes from `reply(body, auth) -> (status, payload)`: for the
    refusals and echoes FakeOpenAI does not make. Records the request bodies and paths."""

    def __init__(self, reply):
        self.reply, self.requests, self.paths = reply, [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.paths.append(self.path)
                status, payload = outer.reply(body, self.headers.get("Authorization", ""))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def refusal(message: str, param=None) -> tuple[int, dict]:
    return 400, {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


def test_every_response_format_refused_steps_down_to_plain_prompting():
    def reply(body, auth):
        if "response_format" in body:  # vLLM-style wording, naming the field in the message only
            return refusal(f"Unsupported 'response_format' type: {body['response_format']['type']}")
        return 200, {"choices": [{"message": {"content": "{}"}, "finish_reason": "length"}]}

    with Scripted(reply) as server:
        (done,), info = complete(server)
    formats = [r.get("response_format", {}).get("type") for r in server.requests]
    assert formats == ["json_schema", "json_object", None]
    assert info["response_format"] == "none" and info["attempts"] == 3 and info["retries"] == 0
    assert (done.text, done.finish_reason, done.prompt_tokens) == ("{}", "length", 0)  # no usage: 0


def test_a_400_naming_no_option_is_an_error_at_once():
    with Scripted(lambda body, auth: refusal("messages: too long for this model")) as server:
        with pytest.raises(EngineError, match="HTTP 400 Bad Request: messages: too long"):
            complete(server, attempts=5)
    assert len(server.requests) == 1


def test_api_key_echoed_in_a_refusal_never_reaches_errors_or_logs(monkeypatch, caplog):
    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)

    def reply(body, auth):
        if "response_format" in body:
            return refusal(f"response_format not allowed for key {auth}")
        return 401, {"error": {"message": f"Incorrect API key provided: {auth}"}}

    with Scripted(reply) as server, pytest.raises(EngineUnusable) as err:
        complete(server)
    assert "HTTP 401 Unauthorized" in str(err.value) and "***" in str(err.value)
    assert secret not in str(err.value) and secret not in caplog.text
    assert "***" in caplog.text  # the step-down warning, redacted


@pytest.mark.parametrize("broken", [b"<html>bad gateway</html>", b'{"choices": []}', b"[1, 2]"])
def test_an_unreadable_or_empty_200_is_retried(broken):
    good = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    with Scripted(lambda body, auth: (200, broken) if len(server.requests) == 1 else (200, good)) as server:
        (done,), info = complete(server)
    assert (done.text, done.prompt_tokens, done.completion_tokens) == ("ok", 3, 1) and info["retries"] == 1


def test_a_refused_connection_is_retried_then_stops_the_engine():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineUnusable, match="no server answers.*connection failed"):
        complete(SimpleNamespace(base_url=f"http://127.0.0.1:{port}/v1"), attempts=2)


def test_proxy_from_the_environment_is_used_and_no_proxy_bypasses_it(monkeypatch):
    ok = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
    with Scripted(lambda body, auth: (200, ok)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.base_url.removesuffix("/v1"))
        (done,), _ = complete(SimpleNamespace(base_url="http://llm.capgen-test.invalid/v1"))
        assert done.text == "ok" and proxy.paths == ["http://llm.capgen-test.invalid/v1/chat/completions"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with FakeOpenAI() as fake:
            complete(fake)
            assert len(fake.requests) == 1 and len(proxy.paths) == 1


def test_the_reused_encoding_follows_the_messages_and_the_options():
    engine = OpenAIEngine(base_urls=["http://127.0.0.1:9/v1"], model="m", schema=answer_json_schema(),
                          sampling=Sampling())
    repair = MESSAGES + [{"role": "assistant", "content": "{坏"}, {"role": "user", "content": "改正：\"引号\""}]
    other = [{"role": "system", "content": "另一个说明"}, MESSAGES[1]]
    for messages in (MESSAGES, repair, other, MESSAGES):
        body = json.loads(engine._body(messages))
        assert body["messages"] == messages and body["response_format"]["type"] == "json_schema"
    engine.format_level, engine.thinking_kwargs = 1, False  # as after two step-downs
    body = json.loads(engine._body(MESSAGES))
    assert body["response_format"] == {"type": "json_object"} and "chat_template_kwargs" not in body
