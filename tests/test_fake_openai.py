"""Checks of the fake OpenAI server itself, over plain HTTP (no openai client involved)."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import CAPRETRIEVAL_CAPTIONS
from fake_openai import FakeOpenAI, default_answer, normalize

KEYS = ["entities", "events", "conjunctions", "simple_conditions", "complex_conditions", "summaries"]
MAX_ITEMS = {"entities": 10, "events": 5, "conjunctions": 4, "simple_conditions": 5,
             "complex_conditions": 4, "summaries": 3}

try:  # cross-check against the project's own validator when it is importable
    from schemas.answer import CaptionQueries
except ImportError:  # pragma: no cover - running the fake's tests outside the repo
    CaptionQueries = None


def real_captions(n: int = 20) -> list[str]:
    with CAPRETRIEVAL_CAPTIONS.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def body(caption: str, **extra) -> dict:
    return {"model": "m", "temperature": 0.0, "max_tokens": 512, "stream": False,
            "messages": [{"role": "system", "content": "你是标注员。"},
                         {"role": "user", "content": f"描述：{caption}\n输出："}], **extra}


def post(fake: FakeOpenAI, payload, *, timeout: float = 20.0, headers: dict | None = None):
    """POST to /chat/completions; returns (status, headers, parsed JSON body)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(fake.base_url + "/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, json.loads(err.read())


def content_of(fake: FakeOpenAI, caption: str, **kw) -> dict:
    status, _, resp = post(fake, body(caption), **kw)
    assert status == 200
    return resp["choices"][0]["message"]


def check_answer(caption: str, content: str) -> None:
    ans = json.loads(content)
    assert list(ans) == KEYS
    for key, limit in MAX_ITEMS.items():
        assert len(ans[key]) <= limit, key
    assert ans["entities"] and ans["summaries"]
    texts = [(s, 80) for s in ans["summaries"]]
    for ent in ans["entities"]:
        assert ent["kind"] in ("object", "person", "place", "concept") and ent["grade"] in (1, 2)
        assert len(ent["hypernyms"]) <= 3
        texts += [(ent["text"], 32)] + [(h, 32) for h in ent["hypernyms"]]
    for key in ("events", "conjunctions", "simple_conditions", "complex_conditions"):
        for item in ans[key]:
            assert set(item) == {"text", "grade"} and item["grade"] in (1, 2)
            texts.append((item["text"], 32))
    for text, limit in texts:
        assert text.strip() and len(text) <= limit, text
        assert normalize(text) != normalize(caption), text
    if CaptionQueries is not None:
        CaptionQueries.model_validate_json(content, context={"caption": caption})


# --------------------------------------------------------------------------- default answer

def test_default_answer_valid_for_real_captions():
    captions = real_captions()
    answers = [default_answer(c) for c in captions]
    for caption, content in zip(captions, answers):
        check_answer(caption, content)
        assert default_answer(caption) == content  # deterministic
    # Built from each caption's own text, so no two captions share their entity lists.
    entity_sets = {tuple(e["text"] for e in json.loads(a)["entities"]) for a in answers}
    assert len(entity_sets) == len(captions)


def test_normalize_matches_project():
    text = pytest.importorskip("schemas.text")
    for caption in real_captions() + ["Ｄｏｇ，A dog!", "猫 图片\n"]:
        assert normalize(caption) == text.normalize(caption)


@pytest.mark.parametrize("caption", [
    "猫", "猫狗", "狗在跑", "a", "Dog", "A dog running on the beach with a red ball",
    "😀", "😀🎉 派对", "!!!", "x" * 60, "猫图片", "一" * 26 + "图片", "图片中有2025年的日历。",
])
def test_default_answer_valid_for_edge_cases(caption):
    check_answer(caption, default_answer(caption))


# --------------------------------------------------------------------------- protocol

def test_models_endpoint_and_404():
    with FakeOpenAI() as fake:
        with urllib.request.urlopen(fake.base_url + "/models", timeout=20) as resp:
            assert json.loads(resp.read()) == {
                "object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(fake.base_url + "/nope", timeout=5)
        with err.value:
            assert err.value.code == 404
    assert fake.base_url.startswith("http://127.0.0.1:")
    with pytest.raises(RuntimeError):  # one run per instance: its records belong to that run
        fake.__enter__()


def test_completion_shape_caption_and_recording():
    caption = "图片中显示了一个安装在墙上的燃气表。"
    with FakeOpenAI() as fake:
        status, _, resp = post(fake, body(caption, response_format={"type": "json_object"},
                                          chat_template_kwargs={"enable_thinking": False}),
                               headers={"Authorization": "Bearer sk-test"})
        assert status == 200
        assert resp["object"] == "chat.completion" and resp["model"] == "m"
        assert {"id", "created", "usage"} <= set(resp)
        (choice,) = resp["choices"]
        assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == default_answer(caption)  # template stripped
        usage = resp["usage"]
        assert usage["completion_tokens"] == len(choice["message"]["content"]) // 2 + 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

        # A repair request: the caption is still taken from the first user message.
        repair = body(caption)
        repair["messages"] += [{"role": "assistant", "content": "{bad"},
                               {"role": "user", "content": "你上一次的输出不符合要求：…"}]
        assert content_of(fake, caption)["content"] == default_answer(caption)
        status, _, resp = post(fake, repair)
        assert resp["choices"][0]["message"]["content"] == default_answer(caption)

        assert len(fake.requests) == 3
        assert fake.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
        assert fake.auth_headers == ["Bearer sk-test", None, None]
        assert fake.count_for("燃气表") == 3 and fake.count_for("不符合要求") == 0
        assert fake.count_for("别的") == 0


def test_custom_answer_and_keep_alive():
    seen = []

    def answer(caption, req):
        seen.append((caption, req["model"]))
        return '{"x": 1}'

    with FakeOpenAI(answer=answer) as fake:
        host, port = fake.base_url.split("//")[1].split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        for cap in ("一", "二"):  # two requests over one HTTP/1.1 connection
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body(cap)),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert json.loads(resp.read())["choices"][0]["message"]["content"] == '{"x": 1}'
        conn.close()
    assert seen == [("一", "m"), ("二", "m")]


def test_bad_bodies_get_400():
    with FakeOpenAI() as fake:
        for payload in (b"not json", b"[1, 2]", json.dumps({"model": "m"}).encode()):
            status, _, resp = post(fake, payload)
            assert status == 400 and resp["error"]["type"] == "invalid_request_error"
        assert fake.requests == []


def test_reject_json_schema_and_chat_template_kwargs():
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    with FakeOpenAI(reject_json_schema=True, reject_chat_template_kwargs=True) as fake:
        status, _, resp = post(fake, body("猫", response_format=schema_fmt))
        assert status == 400
        assert resp["error"]["message"] == "response_format json_schema is not supported"
        assert resp["error"]["param"] == "response_format"
        status, _, resp = post(fake, body("猫", chat_template_kwargs={"enable_thinking": False}))
        assert status == 400 and resp["error"]["param"] == "chat_template_kwargs"
        status, _, _ = post(fake, body("猫", response_format={"type": "json_object"}))
        assert status == 200
    with FakeOpenAI() as fake:  # accepted by default
        assert post(fake, body("猫", response_format=schema_fmt,
                               chat_template_kwargs={"enable_thinking": False}))[0] == 200


def test_constructor_rejects_bad_faults():
    for faults in ({"nope": 0.1}, {"500": 1.5}, {"500": 0.6, "429": 0.6}):
        with pytest.raises(ValueError):
            FakeOpenAI(faults=faults)


# --------------------------------------------------------------------------- faults

@pytest.mark.parametrize("status", ["500", "502", "503"])
def test_server_error_faults(status):
    with FakeOpenAI(faults=lambda i, c: status) as fake:
        code, _, resp = post(fake, body("猫在睡觉"))
    assert code == int(status) and resp["error"]["message"]


def test_429_with_retry_after():
    with FakeOpenAI(faults={"429": 1.0}) as fake:
        code, headers, resp = post(fake, body("猫在睡觉"))
        assert code == 429 and headers["Retry-After"] == "0"
        assert resp == {"error": {"message": "rate limited", "type": "rate_limit_error"}}
    with FakeOpenAI(faults={"429": 1.0}, retry_after="2") as fake:
        assert post(fake, body("猫在睡觉"))[1]["Retry-After"] == "2"


def test_content_faults():
    cap = "一只黑猫睡在窗台上晒太阳"
    valid = default_answer(cap)
    names = ["truncated", "wrong_shape", "empty_choices", "refusal", "reasoning_only",
             "think_wrapped", "fenced", None]
    with FakeOpenAI(faults=lambda i, c: names[i]) as fake:
        msgs = {}
        for name in names:
            status, _, resp = post(fake, body(cap))
            assert status == 200
            msgs[name] = resp["choices"][0]["message"] if resp["choices"] else None
        assert fake.faults_drawn == names
    assert valid.startswith(msgs["truncated"]["content"]) and len(msgs["truncated"]["content"]) < len(valid)
    with pytest.raises(json.JSONDecodeError):
        json.loads(msgs["truncated"]["content"])
    assert "entities" not in json.loads(msgs["wrong_shape"]["content"])
    assert msgs["empty_choices"] is None
    assert msgs["refusal"]["content"] is None and msgs["refusal"]["refusal"]
    assert msgs["reasoning_only"]["content"] is None and msgs["reasoning_only"]["reasoning_content"] == valid
    think = msgs["think_wrapped"]["content"]
    assert think.startswith("<think>\n") and think.split("</think>", 1)[1].strip() == valid
    fenced = msgs["fenced"]["content"]
    assert fenced.startswith("```json\n") and fenced.endswith("```")
    assert fenced.removeprefix("```json").removesuffix("```").strip() == valid
    assert msgs[None]["content"] == valid


def test_drop_closes_without_response():
    with FakeOpenAI(faults=lambda i, c: "drop" if i == 0 else None) as fake:
        port = int(fake.base_url.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body("猫")))
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
        conn.close()
        assert post(fake, body("猫"))[0] == 200  # the server itself is fine


def test_timeout_hangs_without_blocking_others():
    def slow(i, caption):
        return "timeout" if "慢" in caption else None

    with FakeOpenAI(faults=slow, hang_seconds=5) as fake:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            post(fake, body("慢的请求"), timeout=0.2)
        assert post(fake, body("快的请求"))[0] == 200
        assert time.monotonic() - t0 < 2  # the other request did not wait for the hang
    with FakeOpenAI(faults=slow, hang_seconds=0.3) as fake:
        t0 = time.monotonic()
        assert post(fake, body("慢的请求"))[0] == 200  # waited out, a hang ends in an answer
        assert time.monotonic() - t0 >= 0.29


def test_seeded_faults_reproducible():
    faults = {"429": 0.2, "500": 0.1, "truncated": 0.2}

    def run(seed):
        with FakeOpenAI(faults=faults, seed=seed) as fake:
            statuses = [post(fake, body(f"第{i}张图片里的猫"))[0] for i in range(60)]
        return fake.faults_drawn, statuses

    drawn, statuses = run(7)
    assert (drawn, statuses) == run(7)
    assert drawn != run(8)[0]
    assert 12 <= sum(f is not None for f in drawn) <= 48  # about half, loosely
    assert statuses.count(429) == drawn.count("429") and statuses.count(500) == drawn.count("500")


# --------------------------------------------------------------------------- latency / capacity

def _concurrent(fake: FakeOpenAI, n: int) -> float:
    threads = [threading.Thread(target=post, args=(fake, body(f"并发请求{i}"))) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def test_capacity_queues_requests():
    with FakeOpenAI(capacity=1, latency=0.2) as fake:
        assert _concurrent(fake, 2) >= 0.4
    a, b = sorted(fake.timings, key=lambda r: r["t_start_service"])
    assert b["t_start_service"] >= a["t_done"] - 0.01  # served one after the other
    assert all(r["t_arrive"] <= r["t_start_service"] <= r["t_done"] for r in fake.timings)

    with FakeOpenAI(capacity=1, latency=0.05) as fake:  # queued requests are served FIFO
        threads = []
        for i in range(4):
            threads.append(threading.Thread(target=post, args=(fake, body(f"排队{i}"))))
            threads[-1].start()
            while len(fake.requests) <= i:
                time.sleep(0.005)
        for t in threads:
            t.join()
    by_start = sorted(fake.timings, key=lambda r: r["t_start_service"])
    assert [r["index"] for r in by_start] == [0, 1, 2, 3]

    with FakeOpenAI(latency=0.2) as fake:  # unlimited: served side by side
        _concurrent(fake, 2)
    a, b = sorted(fake.timings, key=lambda r: r["t_start_service"])
    assert b["t_start_service"] < a["t_done"]


def test_per_token_latency():
    with FakeOpenAI(per_token_latency=0.001) as fake:
        _, _, resp = post(fake, body("一只黑猫睡在窗台上晒太阳"))
    (rec,) = fake.timings
    assert rec["t_done"] - rec["t_start_service"] >= 0.001 * resp["usage"]["completion_tokens"] - 0.005


# --------------------------------------------------------------------------- shutdown

def test_shutdown_fast_with_requests_in_flight():
    # Request 0 hangs, request 1 is in a 30 s service slot, request 2 queues behind it.
    fake = FakeOpenAI(faults=lambda i, c: "timeout" if i == 0 else None, hang_seconds=30,
                      capacity=1, latency=30)
    errors = []

    def call(i):
        try:
            post(fake, body(f"挂起{i}"), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure is what we expect here
            errors.append(exc)

    with fake:
        threads = []
        for i in range(3):
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
            deadline = time.monotonic() + 2
            while len(fake.requests) <= i and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(fake.requests) == 3
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.0
    for t in threads:
        t.join(timeout=2)
        assert not t.is_alive()
    assert len(errors) == 3  # each client saw its connection close, none waited 10 s
