"""A fake OpenAI batch API on top of tests/fake_openai.py (stdlib only).

    with FakeBatch(line_fault=lambda custom_id, caption: "error" if "猫" in caption else None) as fake:
        ...  # gen.run --batch --base-url fake.base_url

Files: POST /v1/files (multipart), GET /v1/files (cursor pages), GET /v1/files/{id},
GET /v1/files/{id}/content. Batches: POST /v1/batches, GET /v1/batches/{id}, GET /v1/batches
(newest first, cursor pages of `limit` after `after`), POST /v1/batches/{id}/cancel.
A batch moves validating -> in_progress -> finalizing -> `outcome(n)` (completed, failed,
expired or cancelled), one step per GET of it. Each line is answered as the chat endpoint
would (`answer`), then `line_fault(custom_id, caption)` may make it an "error" line (in the
error file), "missing", "duplicate" (the line twice), "truncated" (cut mid-line: the file's
last line), "invalid" (an answer of the wrong shape) or "oversized" (an answer padded to
`oversized_bytes`); `shuffle` writes the output in
another order, `unknown_line` adds a line for a custom_id never sent. An expired or
cancelled batch answers its first half; a failed one none.

`route_fault(method, path, query)` (path as sent, e.g. "/v1/batches") may fault one call
to the files or batches API: "lost" (handled, then the connection closed without a reply),
"502" (handled, then answered 502, as a gateway whose upstream reply was lost), "404" or
"500" (answered so, not handled), "cut" (handled, then the reply's first half sent under the
whole reply's Content-Length, and the connection closed). `calls` records (method, path) of
every call to those APIs.
"""
from __future__ import annotations

import email.parser
import json
import random
import threading
import time
import urllib.parse
from typing import Callable, Optional

from fake_openai import FakeOpenAI, _caption_of, _error, _text_of, _tokens

LineFault = Callable[[str, str], Optional[str]]


def _public(item):
    return {k: v for k, v in item.items() if not k.startswith("_")} if isinstance(item, dict) else item


class FakeBatch(FakeOpenAI):
    def __init__(self, *, outcome: Callable[[int], str] = lambda n: "completed",
                 line_fault: LineFault = lambda custom_id, caption: None, shuffle: bool = False,
                 unknown_line: bool = False, steps: int = 1, max_file_bytes: int = 200_000_000,
                 page_cap: int = 100,
                 route_fault: Callable[[str, str, dict], Optional[str]] = lambda method, path, query: None,
                 **kwargs):
        super().__init__(**kwargs)
        self.outcome, self.line_fault, self.shuffle = outcome, line_fault, shuffle
        self.unknown_line, self.steps, self.max_file_bytes = unknown_line, steps, max_file_bytes
        self.page_cap = page_cap   # list pages hold at most this many, whatever `limit` asks
        self.route_fault = route_fault
        self.calls: list[tuple[str, str]] = []
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}      # in creation order
        self.batch_lines: list[dict] = []       # every request line of every batch, as read
        self._ids = 0
        self._batch_lock = threading.Lock()

    # ------------------------------------------------------------------ routing

    def _route(self, h, method: str, raw: bytes) -> bool:
        url = urllib.parse.urlsplit(h.path)
        parts = [p for p in url.path.split("/") if p]
        query = dict(urllib.parse.parse_qsl(url.query))
        if parts[:2] not in (["v1", "files"], ["v1", "batches"]):
            return False
        with self._batch_lock:
            self.calls.append((method, url.path))
            fault = self.route_fault(method, url.path, query)
            if fault in ("404", "500"):
                h._send(int(fault), _error(f"fake: {fault} on {method} {url.path}", "server_error"))
                return True
            status, payload = self._handle(method, parts[1], parts[2:], query, raw, h.headers)
        if fault == "lost":
            h._drop()
            return True
        if fault == "502":
            h._send(502, _error("fake: bad gateway", "server_error"))
            return True
        if isinstance(payload, dict):   # the fake's own bookkeeping stays here
            payload = {k: ([_public(x) for x in v] if k == "data" else v) for k, v in _public(payload).items()}
        if fault == "cut":
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            h.send_response(status)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h._drop()
        elif isinstance(payload, bytes):
            h._send_bytes(status, payload, {"Content-Type": "application/octet-stream"})
        else:
            h._send(status, payload)
        return True

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids:06d}"

    def _handle(self, method, kind, rest, query, raw, headers):
        if kind == "files":
            if method == "POST" and not rest:
                return self._upload(raw, headers.get("Content-Type", ""))
            if method == "GET" and not rest:
                return 200, self._page([f["meta"] for f in self.files.values()
                                        if query.get("purpose") in (None, f["meta"]["purpose"])], query)
            if method == "GET" and rest[0] in self.files:
                f = self.files[rest[0]]
                return (200, f["data"]) if rest[1:] == ["content"] else (200, f["meta"])
            return 404, _error(f"no such file {rest}", "not_found_error")
        if method == "POST" and not rest:
            return self._create(raw)
        if method == "GET" and not rest:
            return 200, self._page(list(self.batches.values()), query)
        if rest and rest[0] in self.batches:
            b = self.batches[rest[0]]
            if method == "GET" and len(rest) == 1:
                self._advance(b)
                return 200, b
            if method == "POST" and rest[1:] == ["cancel"]:
                if b["status"] not in ("completed", "failed", "expired", "cancelled"):
                    b["status"] = "cancelling"
                return 200, b
        return 404, _error(f"no route {method} /v1/batches/{'/'.join(rest)}", "not_found_error")

    def _page(self, items: list[dict], query: dict) -> dict:
        items = sorted(items, key=lambda x: x["id"], reverse=True)   # newest first
        if "after" in query:
            items = [x for x in items if x["id"] < query["after"]]
        limit = min(int(query.get("limit", 20)), self.page_cap)
        page = items[:limit]
        return {"object": "list", "data": page, "has_more": len(items) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}

    def _upload(self, raw: bytes, content_type: str):
        msg = email.parser.BytesParser().parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + raw)
        fields, data, filename = {}, None, None
        for part in msg.get_payload() if msg.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                data, filename = part.get_payload(decode=True), part.get_filename()
            else:
                fields[name] = part.get_payload(decode=True).decode()
        if data is None or fields.get("purpose") != "batch":
            return 400, _error("a file and purpose=batch are required", "invalid_request_error")
        if len(data) > self.max_file_bytes:
            return 400, _error(f"file size {len(data)} exceeds the limit of {self.max_file_bytes} bytes",
                               "invalid_request_error", "file")
        fid = self._id("file")
        meta = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": "batch", "status": "processed"}
        self.files[fid] = {"meta": meta, "data": data}
        return 200, meta

    def _create(self, raw: bytes):
        try:
            body = json.loads(raw)
            assert body["input_file_id"] in self.files and body["endpoint"] == "/v1/chat/completions"
        except (ValueError, KeyError, AssertionError, TypeError):
            return 400, _error("input_file_id of an uploaded file and endpoint /v1/chat/completions required",
                               "invalid_request_error")
        bid = self._id("batch")
        b = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
             "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window"),
             "status": "validating", "output_file_id": None, "error_file_id": None,
             "created_at": int(time.time()), "request_counts": {"total": 0, "completed": 0, "failed": 0},
             "metadata": body.get("metadata"), "_n": len(self.batches), "_gets": 0}
        self.batches[bid] = b
        return 200, {k: v for k, v in b.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ the batch's life

    def _advance(self, b: dict) -> None:
        b["_gets"] += 1
        if b["_gets"] % self.steps:
            return
        order = ["validating", "in_progress", "finalizing"]
        if b["status"] == "cancelling":
            self._finish(b, "cancelled")
        elif b["status"] in order[:-1]:
            b["status"] = order[order.index(b["status"]) + 1]
        elif b["status"] == "finalizing":
            self._finish(b, self.outcome(b["_n"]))

    def _finish(self, b: dict, status: str) -> None:
        lines = [json.loads(line) for line in self.files[b["input_file_id"]]["data"].splitlines() if line.strip()]
        self.batch_lines.extend(lines)
        b["status"] = status
        if status == "failed":
            b["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": "fake: the batch failed",
                                                       "line": 1, "param": None}]}
            return
        every = lines
        if status in ("expired", "cancelled"):
            lines = lines[: len(lines) // 2]
        out, errs, tail = [], [], None
        for i, line in enumerate(lines):
            cid, body = line["custom_id"], line["body"]
            caption = _caption_of(body)
            fault = self.line_fault(cid, caption)
            if fault == "missing":
                continue
            if fault == "error":
                errs.append({"id": f"req-{i}", "custom_id": cid, "response": {"status_code": 400, "body": {
                    "error": {"message": "fake: this request failed", "type": "invalid_request_error"}}},
                    "error": None})
                continue
            content = json.dumps({"queries": ["a"]}) if fault == "invalid" else self.answer(caption, body)
            if fault == "oversized":   # a valid answer padded with whitespace to oversized_bytes
                content += " " * max(self.oversized_bytes - len(content.encode()), 0)
            prompt = "\n".join(_text_of(m.get("content")) for m in body["messages"])
            reply = {"id": f"chatcmpl-b-{i}", "object": "chat.completion", "model": body.get("model"),
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(content),
                               "total_tokens": _tokens(prompt) + _tokens(content)}}
            row = {"id": f"req-{i}", "custom_id": cid,
                   "response": {"status_code": 200, "request_id": f"r{i}", "body": reply}, "error": None}
            if fault == "truncated":
                tail = json.dumps(row, ensure_ascii=False)[:120]
                continue
            out.append(row)
            if fault == "duplicate":
                out.append(row)
        if self.shuffle:
            random.Random(7).shuffle(out)
        if self.unknown_line and out:
            out.insert(1, {**out[0], "custom_id": "never-sent"})
        if status == "expired":
            errs += [{"id": f"exp-{i}", "custom_id": line["custom_id"], "response": None,
                      "error": {"code": "batch_expired", "message": "This request could not be executed before "
                                "the completion window expired."}}
                     for i, line in enumerate(every[len(lines):], len(lines))]
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out) + (tail or "")
        if out or tail:
            fid = self._id("file")
            self.files[fid] = {"meta": {"id": fid, "object": "file", "bytes": len(data.encode()),
                                        "created_at": int(time.time()), "filename": "batch_output.jsonl",
                                        "purpose": "batch_output", "status": "processed"},
                               "data": data.encode()}
            b["output_file_id"] = fid
        if errs:
            fid = self._id("file")
            blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in errs).encode()
            self.files[fid] = {"meta": {"id": fid, "object": "file", "bytes": len(blob), "created_at": int(time.time()),
                                        "filename": "batch_error.jsonl", "purpose": "batch_output",
                                        "status": "processed"}, "data": blob}
            b["error_file_id"] = fid
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errs)}
