"""report.html: the run's numbers for a person, the same numbers in the manifest, user text escaped."""
import json

from conftest import write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_OK, main


def test_report_shows_the_run_and_escapes_captions(tmp_path, sample_captions):
    caps = [{"id": "x<1>", "text": "<script>alert('猫')</script>一只猫"}] + sample_captions[:10]
    path = write_jsonl(tmp_path / "caps.jsonl", caps)
    path.write_text(path.read_text(encoding="utf-8") + "not json\n", encoding="utf-8")
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(["--captions", str(path), "--out", str(out), "--base-url", fake.base_url,
                     "--model", "fake-model", "--no-progress"]) == EXIT_OK
    page = (out / "report.html").read_text(encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert "<script>" not in page and "&lt;script&gt;" in page
    for heading in ("Queries per type", "Query length", "Rejects by reason", "Sample"):
        assert heading in page
    assert "not valid JSON" in page  # the reject reason is named
    summary = manifest["report"]
    assert summary["rejects_by_reason"] == {"not valid JSON": 1}
    assert sum(summary["queries_by_type_and_grade"].values()) == manifest["counts"]["queries"]
    assert summary["queries_per_caption"] == round(manifest["counts"]["queries"] / 11, 2)
    assert sample_captions[0]["text"] in page and "x&lt;1&gt;" in page  # a sample of captions with their queries
