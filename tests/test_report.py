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


def test_the_counted_figures_equal_a_read_of_the_written_files(tmp_path, sample_captions):
    """The figures are counted as rows are exported; polars over the files must agree."""
    import polars as pl
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions)
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(["--captions", str(path), "--out", str(out), "--base-url", fake.base_url,
                     "--model", "fake-model", "--no-progress", "--no-curate"]) == EXIT_OK
    summary = json.loads((out / "manifest.json").read_text())["report"]
    q = pl.read_parquet(out / "queries.parquet")
    n = q["query"].str.len_chars()
    assert summary["query_chars"] == {"mean": round(n.mean(), 2), "p50": n.median(),
                                      "p90": n.quantile(0.9, "nearest"), "max": n.max()}
    hist = q.group_by(b=pl.min_horizontal(n, pl.lit(25))).len().rows()
    assert summary["query_chars_histogram"] == {str(k): v for k, v in sorted(hist)}
    by = q.group_by("type", "grade").len().rows()
    assert summary["queries_by_type_and_grade"] == {f"{t}/{g}": c for t, g, c in sorted(by)}
    page = (out / "report.html").read_text(encoding="utf-8")
    texts = pl.read_parquet(out / "captions.parquet")["text"].to_list()
    import html
    shown = [html.escape(t) in page for t in texts]
    assert shown[:9] == [True] * 8 + [False]  # the sample: the first 8 captions
    # the quantile rule at the half-way ranks, where Python's round() and polars differ
    from gen.export.report import Tally
    for size in (6, 16, 26, 7):
        t = Tally()
        t.rows({"query": ["字" * k for k in range(1, size + 1)], "type": ["entity"] * size,
                "grade": [2] * size})
        t.caption("c", "t", [])
        s = pl.Series(range(1, size + 1))
        got = t.summary()["query_chars"]
        assert (got["p90"], got["p50"]) == (s.quantile(0.9, "nearest"), s.median()), size
