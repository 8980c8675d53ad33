"""Input that used to stop a run with a traceback or reach the shards: hostile caption lines,
job files of the wrong shape, a config read from a pipe, a missing evaluation file, a stop
signal during start-up, and a judge beside a run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_LOCKED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE, main

PY = sys.executable


def run(captions: Path, out: Path, url: str, *args: str) -> int:
    return main(["--captions", str(captions), "--out", str(out), "--base-url", url, "--model", "fake-model",
                 "--no-progress", "--timeout", "5", "--retry-wait", "0.01", *args])


def rejects(out: Path) -> dict[int, str]:
    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").split("\n")   # not splitlines: U+0085
    return {r["line"]: r["reason"] for r in map(json.loads, filter(None, lines))}


# --------------------------------------------------------------------------- caption lines

def test_a_lone_surrogate_anywhere_in_a_lines_extra_fields_is_a_reject_and_the_run_goes_on(
        tmp_path, sample_captions):
    good = sample_captions[:3]
    lines = [json.dumps(c, ensure_ascii=False) for c in good] + [
        '{"id":"x1","text":"图片中有一只黑猫坐在窗台上晒太阳","meta":"\\ud800"}',
        '{"id":"x2","text":"图片中有一只黑猫坐在窗台上晒太阳","\\ud800": 1}',
        '{"id":"x3","text":"图片中有一只黑猫坐在窗台上晒太阳","meta":{"tags":["ok","\\udfff"]}}',
        '{"id":"x4","text":"图片中有一只黑猫坐在窗台上晒太阳","meta":[{"\\udc80x": 2}]}',
    ]
    captions = tmp_path / "caps.jsonl"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(captions, out, fake.base_url) == EXIT_OK
        assert len(fake.requests) == len(good)   # nothing paid for a line that cannot be kept
    found = rejects(out)
    assert sorted(found) == [4, 5, 6, 7]
    assert all("field 'extra'" in r and "lone surrogate" in r for r in found.values())
    assert "'meta'" in found[4] and "key '\\ud800'" in found[5]
    assert "'meta'['tags'][1]" in found[6] and "key 'meta'[0]['\\udc80x']" in found[7]
    ids = [r["id"] for r in pq.read_table(out / "captions.parquet").to_pylist()]
    assert sorted(ids) == sorted(c["id"] for c in good)


@pytest.mark.parametrize("bad_id, char", [
    ("cr.0\u202eevil", "U+202E"),   # right-to-left override
    ("cr.1\x85x", "U+0085"),        # C1 control (NEL)
    ("cr.2\u200bx", "U+200B"),      # zero-width space
    ("cr.3\u2066x\u2069", "U+2066"),  # bidi isolate
    ("cr.4\ufeffx", "U+FEFF"),      # BOM inside
    ("cr.5\tx", "U+0009"),
])
def test_a_control_or_format_character_in_an_id_is_a_reject_naming_line_and_field(
        tmp_path, sample_captions, bad_id, char):
    rows = [dict(c) for c in sample_captions[:2]] + [{"id": bad_id, "text": "图片中有一只黑猫坐在窗台上晒太阳"}]
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(write_jsonl(tmp_path / "caps.jsonl", rows), out, fake.base_url) == EXIT_OK
    found = rejects(out)
    assert list(found) == [3]
    assert "field 'id'" in found[3] and char in found[3]
    latest = out / "shards" / "latest"
    written = [*latest.rglob("*.parquet"), out / "queries.parquet", out / "captions.parquet"]
    assert len(written) > 2
    for p in written:
        assert all(bad_id not in json.dumps(r, ensure_ascii=False) for r in pq.read_table(p).to_pylist()), p
    for p in latest.rglob("*.jsonl"):   # beir/corpus.jsonl, qrels
        assert bad_id not in p.read_text(encoding="utf-8"), p
