"""gen.run curates into shards/<version>/ and moves shards/latest only after a good curation."""
import json
import os

import pytest
from conftest import write_jsonl
from fake_openai import FakeOpenAI

import gen.publish
from gen.run import EXIT_FAILED, EXIT_OK, main


def run(path, out, fake, *extra):
    return main(["--captions", str(path), "--out", str(out), "--base-url", fake.base_url,
                 "--model", "fake-model", "--no-progress", *extra])


def test_versions_and_the_latest_pointer(tmp_path, sample_captions, monkeypatch):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:20])
    out = tmp_path / "out"
    shards = out / "shards"
    with FakeOpenAI() as fake:
        assert run(path, out, fake) == EXIT_OK
        first = os.readlink(shards / "latest")
        m = json.loads((out / "manifest.json").read_text())
        assert m["curation"]["dir"] == f"shards/{first}" and m["curation"]["reused"] is False
        assert (shards / "latest" / "manifest.json").is_file()
        assert any((shards / "latest").glob("flag/train-*.jsonl"))
        assert "Curation: dropped by filter" in (out / "report.html").read_text(encoding="utf-8")

        # same captions, same settings: no new version, the pointer stays
        assert run(path, out, fake) == EXIT_OK
        assert os.readlink(shards / "latest") == first
        assert json.loads((out / "manifest.json").read_text())["curation"]["reused"] is True

        # appended captions: only they are generated, and a new version appears beside the old
        write_jsonl(path, sample_captions[:30])
        assert run(path, out, fake) == EXIT_OK
        second = os.readlink(shards / "latest")
        assert second != first and (shards / first).is_dir() and len(fake.requests) == 30

        # a curation that fails leaves the pointer on the last good version
        def broken(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(gen.publish, "curate", broken)
        write_jsonl(path, sample_captions[:35])
        assert run(path, out, fake) == EXIT_FAILED
        assert os.readlink(shards / "latest") == second


def test_no_curate_stops_after_generation(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:5])
    with FakeOpenAI() as fake:
        assert run(path, tmp_path / "out", fake, "--no-curate") == EXIT_OK
    assert not (tmp_path / "out" / "shards").exists()
    assert "curation" not in json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_decontaminate_flag_reaches_curation(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:20])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": sample_captions[3]["text"]}])
    with FakeOpenAI() as fake:
        assert run(path, tmp_path / "out", fake, "--decontaminate-against", str(evals)) == EXIT_OK
    cur = json.loads((tmp_path / "out" / "manifest.json").read_text())["curation"]
    assert cur["stats"]["decontamination"]["captions_dropped"] == 1


def test_recurating_alone_makes_a_new_version_without_the_llm(tmp_path, sample_captions):
    import subprocess
    import sys
    from conftest import ROOT
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:20])
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(path, out, fake) == EXIT_OK
    first = os.readlink(out / "shards" / "latest")
    p = subprocess.run([sys.executable, "-m", "gen.curate", "--queries", str(out), "--negatives", "3"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    second = os.readlink(out / "shards" / "latest")
    assert second != first
    manifest = json.loads((out / "shards" / "latest" / "manifest.json").read_text())
    assert manifest["settings"]["negatives"] == 3
