"""A fake OpenAI-compatible chat-completions server for tests and benchmarks (stdlib only).

    with FakeOpenAI(faults={"429": 0.1}, seed=1) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="x")
        ...
        assert fake.count_for("燃气表") == 1

It answers every caption with `default_answer` (a valid capgen answer built from the
caption's own substrings), can inject transport and content faults, refuse options that
hosted APIs refuse, refuse the key or the model as hosted APIs and vLLM do, go away for a
while (`outage`), and model service time and a concurrency limit for benchmarks.
It binds to 127.0.0.1 only.
"""
from __future__ import annotations

import collections
import json
import random
import re
import socket
import struct
import sys
import threading
import time
import unicodedata
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["FakeOpenAI", "FAULTS", "default_answer", "normalize"]

FAULTS = (
    "429", "500", "502", "503", "timeout", "drop", "truncated", "wrong_shape",
    "empty_choices", "refusal", "reasoning_only", "think_wrapped", "fenced",
    # Hostile replies: what a broken or malicious server may send with a 200.
    "empty_content", "lone_surrogate", "oversized", "gzip_bomb", "content_not_string",
    "message_not_object", "choices_not_list", "usage_wrong_type",
    "401", "403", "403_surrogate", "403_content", "insufficient_quota",
)
# OpenAI's wording; a 401 echoes the start of the key it refused, as OpenAI's does.
_ERROR_STATUS = {
    "500": (500, "internal server error", "server_error", None),
    "502": (502, "bad gateway", "server_error", None),
    "503": (503, "service unavailable", "server_error", None),
    "401": (401, "Incorrect API key provided: {key}. You can find your API key at "
                 "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key"),
    "403": (403, "You are not allowed to sample from this model", "invalid_request_error", None),
    # the same, with a lone surrogate (its \ud800 escape on the wire) in the message
    "403_surrogate": (403, "You are not allowed to sample from this model \ud800", "invalid_request_error", None),
    # DashScope's content filter: this request's text refused, not the key
    "403_content": (403, "Input data may contain inappropriate content.", "data_inspection_failed",
                    "DataInspectionFailed"),
    "insufficient_quota": (429, "You exceeded your current quota, please check your plan and billing "
                                "details.", "insufficient_quota", "insufficient_quota"),
}
_USER_PREFIX, _USER_SUFFIX = "描述：", "输出："
# serve_forever's poll interval, which bounds how long shutdown() takes (default 0.5 s).
_POLL = 0.05

FaultSpec = dict[str, float] | Callable[[int, str], "str | None"] | None
Answer = Callable[[str, dict], str]


# --------------------------------------------------------------------------- the default answer

# Copy of schemas.text.normalize: the fake must not import the project it is testing.
_DROP_CATEGORIES = {"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Zs", "Zl", "Zp", "Cc", "Cf"}


def normalize(text: str) -> str:
    """NFKC, case-fold, drop punctuation and spaces (same as schemas.text.normalize)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in folded if unicodedata.category(c) not in _DROP_CATEGORIES)


_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A CJK run, or a run of other letters/digits (a word); emoji and punctuation separate them.
_TOKEN = re.compile(f"[{_CJK}]+|[^\\W_{_CJK}]+")
_KIND = ("object", "person", "place", "concept")


def _chunks(caption: str) -> list[str]:
    """Caption substrings usable as keywords: CJK runs cut into 2-4 chars, other words whole.

    The cut pattern is seeded by a CRC of the caption (not hash(), which varies per process),
    so one caption always gives the same chunks and different captions give different ones.
    """
    sizes = (2, 3, 4, 2, 3)
    k = zlib.crc32(caption.encode("utf-8"))
    out: list[str] = []
    for run in _TOKEN.findall(caption):
        if not re.match(f"[{_CJK}]", run):
            out.append(run[:32])
            continue
        pos = 0
        while pos < len(run):
            size = sizes[k % len(sizes)]
            k += 1
            piece = run[pos:pos + size]
            pos += size
            if len(piece) == 1 and out and re.match(f"[{_CJK}]", out[-1][-1]):
                out[-1] += piece  # a lone trailing character means little on its own
            else:
                out.append(piece)
    return list(dict.fromkeys(out))  # unique, first occurrence kept


def default_answer(caption: str) -> str:
    """A deterministic answer that passes capgen's CaptionQueries validation for `caption`."""
    cap_norm = normalize(caption)

    def ok(text: str, limit: int = 32) -> str | None:
        text = text.strip()
        good = text and len(text) <= limit and normalize(text) != cap_norm
        return text if good else None

    has_cjk = re.search(f"[{_CJK}]", caption) is not None
    suffix = "图片" if has_cjk else " photo"
    # Guaranteed to pass `ok`: the caption (or its head) plus a suffix. The second suffix
    # covers a caption that happens to be exactly "<head>图片".
    fallback = next(t for t in (caption.strip()[:26] + suffix, caption.strip()[:26] + "图像") if ok(t))

    chunks = [c for c in _chunks(caption) if ok(c)] or [fallback]
    joiner = "" if has_cjk else " "

    def pairs(fmt: str, limit: int) -> list[dict]:
        items = []
        for a, b in zip(chunks, chunks[1:]):
            text = ok(fmt.format(a=a, b=b, j=joiner))
            if text and len(items) < limit:
                items.append({"text": text, "grade": 2 if len(items) % 2 == 0 else 1})
        return items

    entities = []
    for i, chunk in enumerate(chunks[:6]):
        # A "hypernym" that is still a substring of the caption: the tail of the chunk.
        hyper = ok(chunk[-2:] if has_cjk and len(chunk) > 2 else chunk + ("类" if has_cjk else " thing"))
        entities.append({"text": chunk, "kind": _KIND[i % len(_KIND)],
                         "hypernyms": [hyper] if hyper and hyper != chunk else [],
                         "grade": 1 if i % 3 == 2 else 2})
    triples = [ok(joiner.join(chunks[i:i + 3])) for i in range(0, max(len(chunks) - 2, 0), 3)]
    summaries = [s for s in (ok(caption.strip()[:20] + ("的" if has_cjk else "") + suffix, 80),
                             ok(joiner.join(chunks[:4]) + suffix, 80) if len(chunks) > 1 else None) if s]
    answer = {
        "entities": entities,
        "events": pairs("{a}{j}{b}", 3),
        "conjunctions": pairs("{a}和{b}" if has_cjk else "{a} and {b}", 2),
        "simple_conditions": pairs("{a}的{b}" if has_cjk else "{b} with {a}", 2),
        "complex_conditions": [{"text": t, "grade": 2} for t in triples if t][:2],
        "summaries": list(dict.fromkeys(summaries))[:3] or [fallback],
    }
    return json.dumps(answer, ensure_ascii=False)


# --------------------------------------------------------------------------- helpers

def _text_of(content: Any) -> str:
    # Message content may be a string or a list of typed parts (the vision format).
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _first_user_text(body: dict) -> str:
    # The FIRST user message holds the caption; in a repair request the last one does not.
    for msg in body.get("messages") or []:
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _text_of(msg.get("content"))
    return ""


def _caption_of(body: dict) -> str:
    """The caption, unwrapped from capgen's user template `描述：{caption}\n输出：`."""
    text = _first_user_text(body).strip()
    return text.removeprefix(_USER_PREFIX).strip().removesuffix(_USER_SUFFIX).strip()


def _tokens(text: str) -> int:
    return len(text) // 2 + 1


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "6m0s", "1.5s", "120ms"."""
    if seconds < 1:
        return f"{max(seconds, 0) * 1000:.0f}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


def _error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Dropped(Exception):
    """The handler must close the connection without a response (fault "drop", or shutdown)."""


# --------------------------------------------------------------------------- the server

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 makes a benchmark's burst of connections see SYN retries
    # (a 1 s stall each), which would be measured as server latency.
    request_queue_size = 1024

    def __init__(self, fake: "FakeOpenAI", port: int = 0):
        self.fake = fake
        self.open_connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Handler)

    def handle_error(self, request, client_address):
        # Clients that time out or hang up mid-response are part of the tests, not errors.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, as the openai client (httpx) expects; every response sets Content-Length.
    protocol_version = "HTTP/1.1"
    # Without TCP_NODELAY each keep-alive reply waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def setup(self):
        super().setup()
        with self.server.fake._lock:
            self.server.open_connections.add(self.connection)

    def finish(self):
        with self.server.fake._lock:
            self.server.open_connections.discard(self.connection)
        super().finish()

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        try:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate travels as its \uXXXX escape, as JSON allows
            data = json.dumps(payload).encode("ascii")
        self._send_bytes(status, data, headers)

    def _send_bytes(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self):
        if self.server.fake._route(self, "GET", b""):
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.server.fake.model, "object": "model", "owned_by": "fake"}]})
        else:
            self._send(404, _error(f"no route GET {self.path}", "not_found_error"))

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.fake._route(self, "POST", raw):
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error(f"no route POST {self.path}", "not_found_error"))
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("body must be an object with a messages list")
        except ValueError as exc:
            self._send(400, _error(f"invalid request body: {exc}", "invalid_request_error"))
            return
        try:
            self.server.fake._complete(self, body)
        except _Dropped:
            self._drop()


class FakeOpenAI:
    """Context manager running the fake server on 127.0.0.1:<free port> in a daemon thread.

    faults: {name: probability} drawn per request from random.Random(seed) (at most one fault
      per request; probabilities must sum to <= 1), or a callable (request_index, caption) ->
      fault name or None for exact scripts. request_index counts /v1/chat/completions requests
      from 0 in arrival order, i.e. the index into `requests`.
    oversized_bytes, bomb_bytes: the size of fault "oversized"'s content, and of fault
      "gzip_bomb"'s reply once decompressed (it travels gzipped, Content-Encoding gzip;
      bomb_bytes in whole MiB).
    check_model: answer a request for any model but `model` with vLLM's 404 "The model `x`
      does not exist.", as a real server does.
    latency, per_token_latency, capacity: a request producing a completion holds one of
      `capacity` service slots (unlimited if None) for latency + per_token_latency *
      completion_tokens seconds; the rest queue. HTTP errors (4xx/5xx), "drop" and "timeout"
      are answered without taking a slot.
    rate_limit: (requests, tokens, window seconds), or None: a provider's limits. A request
      costs 1 request and its usage (prompt + completion tokens), charged on arrival; one that
      would exceed either limit within the window is answered 429 (nothing charged, no
      Retry-After). rate_window_kind "sliding" counts the last `window` seconds, "fixed"
      counts windows aligned to the server's start. rate_headers: every chat reply carries
      x-ratelimit-limit/remaining/reset-requests/-tokens (reset in OpenAI's form, "1.5s",
      "120ms": the time until the budget is whole again). extra_headers: sent on every chat
      reply (after those, so they can override them: hostile values for tests).
    Recorded, all thread-safe appends: requests (bodies), auth_headers (Authorization value or
    None), faults_drawn (fault name or None), all three aligned by request index; timings
    (one dict per answered or dropped request, in completion order: index, fault, status
    (0 = dropped), t_arrive, t_start_service (None if it never took a slot), t_done; all
    time.monotonic(); and charged, the tokens the rate limit counted, 0 when it did not).
    """

    def __init__(self, *, answer: Answer | None = None, faults: FaultSpec = None, seed: int = 0,
                 latency: float = 0.0, per_token_latency: float = 0.0, capacity: int | None = None,
                 reject_json_schema: bool = False, reject_chat_template_kwargs: bool = False,
                 retry_after: str | None = "0", hang_seconds: float = 30.0, model: str = "fake-model",
                 oversized_bytes: int = 20_000_000, bomb_bytes: int = 200 << 20,
                 check_model: bool = False,
                 rate_limit: tuple[int, int, float] | None = None, rate_window_kind: str = "sliding",
                 rate_headers: bool = False, extra_headers: dict[str, str] | None = None):
        if rate_window_kind not in ("sliding", "fixed"):
            raise ValueError("rate_window_kind must be sliding or fixed")
        if isinstance(faults, dict):
            unknown = set(faults) - set(FAULTS)
            if unknown:
                raise ValueError(f"unknown fault names {sorted(unknown)}; known: {FAULTS}")
            if any(not 0 <= p <= 1 for p in faults.values()) or sum(faults.values()) > 1 + 1e-9:
                raise ValueError("fault probabilities must be in [0, 1] and sum to <= 1")
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1 or None")
        self.answer = answer or (lambda caption, body: default_answer(caption))
        self.faults = faults
        self.latency, self.per_token_latency = latency, per_token_latency
        self.reject_json_schema = reject_json_schema
        self.reject_chat_template_kwargs = reject_chat_template_kwargs
        self.retry_after, self.hang_seconds, self.model = retry_after, hang_seconds, model
        self.oversized_bytes, self.bomb_bytes = oversized_bytes, bomb_bytes
        self._bomb_tail: bytes | None = None
        self.check_model = check_model
        self.rate_limit, self.rate_window_kind = rate_limit, rate_window_kind
        self.rate_headers, self.extra_headers = rate_headers, dict(extra_headers or {})
        self._charges: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self._window_start = time.monotonic()

        self.requests: list[dict] = []
        self.auth_headers: list[str | None] = []
        self.faults_drawn: list[str | None] = []
        self.timings: list[dict] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._capacity = capacity
        self._free_slots = capacity or 0
        self._queue: collections.deque[threading.Event] = collections.deque()
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def _route(self, h: "_Handler", method: str, raw: bytes) -> bool:
        """Other endpoints, for subclasses (tests/fake_batch.py): True when answered."""
        return False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "FakeOpenAI":
        if self._stop.is_set() or self._server is not None:
            raise RuntimeError("a FakeOpenAI runs once; make a new one")
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": _POLL},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop fast even with requests in flight: waits abort, open sockets are shut down."""
        if self._server is None or self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            for turn in self._queue:  # queued requests give up (they see _stop)
                turn.set()
            self._queue.clear()
            server, thread = self._server, self._thread
        self._shut(server, thread)

    def _shut(self, server: _Server, thread: threading.Thread) -> None:
        server.shutdown()
        with self._lock:
            conns = list(server.open_connections)
        for conn in conns:  # unblocks handler threads idling on keep-alive reads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        thread.join(timeout=2)

    def outage(self, seconds: float) -> threading.Thread:
        """Refuse connections for `seconds` (math.inf: for good), as a server that stopped or
        restarts does, then serve again on the same port; open connections are cut. Returns
        at once, so a faults script may call it; the returned thread ends when it serves again."""
        t = threading.Thread(target=self._outage, args=(seconds,), name="fake-openai-outage", daemon=True)
        t.start()
        return t

    def _outage(self, seconds: float) -> None:
        with self._lock:
            server, thread = self._server, self._thread
        if server is None or self._stop.is_set():
            return
        self._shut(server, thread)
        if self._stop.wait(seconds if seconds != float("inf") else None):
            return
        new = _Server(self, port=server.server_address[1])
        thread = threading.Thread(target=new.serve_forever, kwargs={"poll_interval": _POLL},
                                  name="fake-openai", daemon=True)
        with self._lock:
            if self._stop.is_set():
                new.server_close()
                return
            self._server, self._thread = new, thread
        thread.start()

    # ------------------------------------------------------------------ queries

    def count_for(self, text: str) -> int:
        """How many chat requests had `text` in their first user message (the caption's)."""
        with self._lock:
            bodies = list(self.requests)
        return sum(text in _first_user_text(b) for b in bodies)

    # ------------------------------------------------------------------ request handling

    def _sleep(self, seconds: float) -> None:
        """Sleep that raises _Dropped as soon as the server shuts down."""
        if seconds > 0 and self._stop.wait(seconds):
            raise _Dropped

    def _draw(self, index: int, caption: str) -> str | None:
        if callable(self.faults):
            return self.faults(index, caption)
        if not self.faults:
            return None
        # One draw per request whatever the dict holds, so a seed gives one sequence of draws.
        u, acc = self._rng.random(), 0.0
        for name, p in self.faults.items():
            acc += p
            if u < acc:
                return name
        return None

    def _rejection(self, body: dict) -> dict | None:
        if self.check_model and body.get("model") != self.model:
            return _error(f"The model `{body.get('model')}` does not exist.", "NotFoundError", None, 404)
        fmt = body.get("response_format")
        if self.reject_json_schema and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            return _error("response_format json_schema is not supported", "invalid_request_error",
                          "response_format")
        if self.reject_chat_template_kwargs and "chat_template_kwargs" in body:
            return _error("Unrecognized request argument supplied: chat_template_kwargs",
                          "invalid_request_error", "chat_template_kwargs")
        if body.get("stream"):
            return _error("stream is not supported by the fake", "invalid_request_error", "stream")
        return None

    def _complete(self, h: _Handler, body: dict) -> None:
        t_arrive = time.monotonic()
        caption = _caption_of(body)
        rejection = self._rejection(body)
        # Under one lock so the lists stay aligned and seeded draws follow arrival order.
        with self._lock:
            index = len(self.requests)
            self.requests.append(body)
            self.auth_headers.append(h.headers.get("Authorization"))
            fault = None if rejection else self._draw(index, caption)
            self.faults_drawn.append(fault)
        record = {"index": index, "fault": fault, "t_arrive": t_arrive, "t_start_service": None, "charged": 0}

        def done(status: int) -> None:
            record.update(status=status, t_done=time.monotonic())
            with self._lock:
                self.timings.append(record)

        if rejection:
            status = rejection["error"]["code"] or 400
            h._send(status, rejection)
            return done(status)
        if fault is not None and fault not in FAULTS:
            h._send(500, _error(f"fake: unknown fault name {fault!r}", "server_error"))
            return done(500)
        if fault == "429":
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            h._send(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}}, headers)
            return done(429)
        if fault in _ERROR_STATUS:
            status, message, type_, code = _ERROR_STATUS[fault]
            key = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
            h._send(status, _error(message.format(key=key[:3] + "*" * 8 + key[-4:]), type_, None, code))
            return done(status)
        if fault == "drop":
            done(0)
            raise _Dropped
        if fault == "timeout":
            self._sleep(self.hang_seconds)  # the client should give up first

        valid = self.answer(caption, body)
        prompt = "\n".join(_text_of(m.get("content")) for m in body["messages"] if isinstance(m, dict))
        prompt_tokens = _tokens(prompt)
        limit_headers: dict[str, str] = {}
        if self.rate_limit is not None:
            admitted, limit_headers = self._charge(prompt_tokens + _tokens(valid))
            record["charged"] = (prompt_tokens + _tokens(valid)) if admitted else 0
            if not admitted:
                h._send(429, {"error": {"message": "Rate limit reached for requests or tokens per minute",
                                        "type": "requests", "code": "rate_limit_exceeded"}},
                        {**limit_headers, **self.extra_headers})
                return done(429)
        message: dict[str, Any] = {"role": "assistant", "content": valid}
        choices_empty = False
        if fault == "truncated":
            message["content"] = valid[: len(valid) // 2]
        elif fault == "wrong_shape":
            message["content"] = json.dumps({"queries": ["a", "b"]})
        elif fault == "empty_choices":
            choices_empty = True
        elif fault == "refusal":
            message.update(content=None, refusal="I can't help with that.")
        elif fault == "reasoning_only":
            message.update(content=None, reasoning_content=valid)
        elif fault == "think_wrapped":
            message["content"] = "<think>\n用户要检索查询词，我先找出描述里的实体和事件。\n</think>\n" + valid
        elif fault == "fenced":
            message["content"] = "```json\n" + valid + "\n```"
        elif fault == "empty_content":
            message["content"] = ""
        elif fault == "lone_surrogate":   # JSON's \ud800 escape: valid JSON, not valid text
            message["content"] = valid[:40] + "\ud800" + valid[40:]
        elif fault == "oversized":        # a valid answer, then whitespace up to oversized_bytes
            message["content"] = valid + " " * max(self.oversized_bytes - len(valid.encode()), 0)
        elif fault == "content_not_string":
            message["content"] = {"text": valid}
        generated = message.get("content") or message.get("reasoning_content") or message.get("refusal") or ""
        completion_tokens = _tokens(generated if isinstance(generated, str) else "")

        if fault != "timeout":  # a hung request already spent its time
            self._serve(record, self.latency + self.per_token_latency * completion_tokens)
        reply = {
            "id": f"chatcmpl-fake-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [] if choices_empty else [
                {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        if fault == "message_not_object":
            reply["choices"][0]["message"] = valid
        elif fault == "choices_not_list":
            reply["choices"] = {"0": reply["choices"][0]}
        elif fault == "usage_wrong_type":
            reply["usage"] = {"prompt_tokens": "many", "completion_tokens": [1], "total_tokens": 10 ** 30}
        headers = {**limit_headers, **self.extra_headers}
        if fault == "gzip_bomb":
            h._send_bytes(200, self._bomb(reply), {"Content-Encoding": "gzip", **headers})
        else:
            h._send(200, reply, headers)
        done(200)

    def _charge(self, tokens: int) -> tuple[bool, dict[str, str]]:
        """Charge one request of `tokens` against the rate limit if it fits: (admitted, the
        x-ratelimit-* headers as they stand after it, when rate_headers is on)."""
        max_requests, max_tokens, window = self.rate_limit
        with self._lock:
            now = time.monotonic()
            if self.rate_window_kind == "sliding":
                while self._charges and self._charges[0][0] + window <= now:
                    self._charges.popleft()
            elif now >= self._window_start + window:
                self._window_start += window * ((now - self._window_start) // window)
                self._charges.clear()
            used = sum(n for _, n in self._charges)
            admitted = len(self._charges) < max_requests and used + tokens <= max_tokens
            if admitted:
                self._charges.append((now, tokens))
                used += tokens
            if not self.rate_headers:
                return admitted, {}
            if self.rate_window_kind == "sliding":   # whole again when the newest charge leaves
                reset = self._charges[-1][0] + window - now if self._charges else 0.0
            else:
                reset = self._window_start + window - now
            return admitted, {
                "x-ratelimit-limit-requests": str(max_requests), "x-ratelimit-limit-tokens": str(max_tokens),
                "x-ratelimit-remaining-requests": str(max_requests - len(self._charges)),
                "x-ratelimit-remaining-tokens": str(max(max_tokens - used, 0)),
                "x-ratelimit-reset-requests": _duration(reset), "x-ratelimit-reset-tokens": _duration(reset)}

    def _bomb(self, reply: dict) -> bytes:
        """The reply, a valid answer, followed by `bomb_bytes` of whitespace (still valid JSON),
        as one gzip member: about a thousandth of its size on the wire. The padding is
        deflated once, in 1 MiB pieces (the fake must not hold what it bombs with), and
        follows each reply after a full flush, which leaves it nothing to refer back to."""
        mib = b" " * (1 << 20)
        pieces = self.bomb_bytes >> 20
        with self._lock:
            if self._bomb_tail is None:
                c = zlib.compressobj(9, zlib.DEFLATED, -15)
                self._bomb_tail = b"".join([c.compress(mib) for _ in range(pieces)] + [c.flush()])
        head = json.dumps(reply, ensure_ascii=False).encode("utf-8")
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        start = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
        crc = zlib.crc32(head)
        for _ in range(pieces):
            crc = zlib.crc32(mib, crc)
        size = (len(head) + (pieces << 20)) & 0xFFFFFFFF
        return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + start + self._bomb_tail
                + struct.pack("<II", crc, size))

    def _serve(self, record: dict, seconds: float) -> None:
        """Hold one service slot for `seconds`, queueing first (FIFO) if capacity is set."""
        if self._capacity is not None:
            self._acquire_slot()
        try:
            record["t_start_service"] = time.monotonic()
            self._sleep(seconds)
        finally:
            if self._capacity is not None:
                self._release_slot()

    # A FIFO of per-waiter Events rather than a Semaphore: arrival order is service order
    # (like a server's FCFS scheduler), nothing polls (hundreds of queued threads polling
    # for shutdown cost enough GIL time to distort benchmark timings), and close() can
    # wake every waiter at once.
    def _acquire_slot(self) -> None:
        with self._lock:
            if self._stop.is_set():
                raise _Dropped
            if self._free_slots > 0:
                self._free_slots -= 1
                return
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()  # set by a finishing request handing over its slot, or by close()
        if self._stop.is_set():
            raise _Dropped

    def _release_slot(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().set()
            else:
                self._free_slots += 1


def main(argv: list[str] | None = None) -> None:
    """Serve from a process of its own, so a benchmark's client does not share its GIL.

    python tests/fake_openai.py --capacity 16 --latency 0.5 --faults '{"429": 0.05}'
    prints the base URL on the first line of stdout and serves until interrupted.
    """
    import argparse
    import signal

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--per-token-latency", type=float, default=0.0)
    ap.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--faults", type=json.loads, default=None, help="JSON object: fault name -> probability")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reject-json-schema", action="store_true")
    ap.add_argument("--reject-chat-template-kwargs", action="store_true")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run __exit__ on a plain kill too
    with FakeOpenAI(latency=args.latency, per_token_latency=args.per_token_latency,
                    capacity=args.capacity, faults=args.faults, seed=args.seed,
                    reject_json_schema=args.reject_json_schema,
                    reject_chat_template_kwargs=args.reject_chat_template_kwargs) as fake:
        print(fake.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
