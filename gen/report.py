"""report.html: what a person checks at a glance after a run, and the same numbers as data.

`summarize` computes the figures (queries per type and grade, lengths, rejects by reason,
a sample of captions with their queries) for the manifest; `render` draws them as one
self-contained HTML page with inline SVG charts: no scripts, no network, opens anywhere.
Every value from the data is escaped: captions are user text.
"""
from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from schemas import QUERY_TYPES

SAMPLE_CAPTIONS = 8


def summarize(out_dir: Path) -> dict[str, Any]:
    """Aggregates over lazy scans: memory stays flat however many queries the run made."""
    q = pl.scan_parquet(out_dir / "queries.parquet")
    n_captions = pl.scan_parquet(out_dir / "captions.parquet").select(pl.len()).collect().item()
    n_queries = q.select(pl.len()).collect().item()
    by_type_grade = q.group_by("type", "grade").len().collect().rows()
    n = pl.col("query").str.len_chars()
    stats = q.select(mean=n.mean(), p50=n.median(), p90=n.quantile(0.9), max=n.max()).collect().row(0, named=True)
    hist = q.group_by(b=pl.min_horizontal(n, pl.lit(25))).len().collect().rows()
    reasons: Counter = Counter()
    with (out_dir / "rejects.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                reasons[json.loads(line)["reason"].split(":")[0].split(" (")[0]] += 1
    sample_caps = pl.scan_parquet(out_dir / "captions.parquet").select("id", "text").head(SAMPLE_CAPTIONS).collect()
    sample_rows = (q.filter(pl.col("caption_id").is_in(sample_caps["id"].implode()))
                   .select("caption_id", "type", "query", "grade", "salience").collect())
    sample = []
    for cid, text in sample_caps.iter_rows():
        rows = sample_rows.filter(pl.col("caption_id") == cid).drop("caption_id").rows()
        rows.sort(key=lambda r: (QUERY_TYPES.index(r[0]) if r[0] in QUERY_TYPES else 99, r[3]))
        sample.append({"id": cid, "text": text, "queries": [
            {"type": t, "query": s, "grade": g} for t, s, g, _ in rows]})
    return {
        "queries_by_type_and_grade": {f"{t}/{g}": c for t, g, c in sorted(by_type_grade)},
        "query_chars": {"mean": round(stats["mean"] or 0, 2), "p50": stats["p50"],
                        "p90": stats["p90"], "max": stats["max"]},
        "query_chars_histogram": {str(k): v for k, v in sorted(hist)},
        "queries_per_caption": round(n_queries / n_captions, 2) if n_captions else 0,
        "rejects_by_reason": dict(reasons.most_common()),
        "sample": sample,
    }


def _bars(items: list[tuple[str, float]], unit: str = "", width: int = 520) -> str:
    if not items:
        return "<p class=muted>none</p>"
    top = max(v for _, v in items) or 1
    row, label_w = 22, 190
    parts = [f'<svg width="{width}" height="{row * len(items) + 4}" role="img">']
    for i, (label, value) in enumerate(items):
        w = (width - label_w - 70) * value / top
        y = i * row
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="16" fill="#4a7bd0"/>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 15}">{value:g}{unit}</text>')
    return "".join(parts) + "</svg>"


def _table(rows: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def render(manifest: dict[str, Any], summary: dict[str, Any]) -> str:
    c, u, t = manifest["counts"], manifest["usage"], manifest["timings"]
    by_type = [(k, c["queries_by_type"].get(k, 0)) for k in QUERY_TYPES]
    grade = Counter()
    for key, n in summary["queries_by_type_and_grade"].items():
        grade[f"grade {key.split('/')[1]}"] += n
    hist = [(f"{k}{'+' if k == '25' else ''} chars", v) for k, v in summary["query_chars_histogram"].items()]
    sections = [
        ("Run", _table([("captions file", manifest["captions_file"]), ("model", manifest["model"]),
                        ("engine", manifest["engine"].get("engine")), ("fingerprint", manifest["fingerprint"][:16]),
                        ("total time", f"{t['total_s']} s"), ("requests", u["requests"]),
                        ("prompt tokens", u["prompt_tokens"]), ("completion tokens", u["completion_tokens"])])),
        ("Captions", _bars([("with queries", c["captions_with_queries"]), ("from the store (cached)", c["cached"]),
                            ("rejected input lines", c["input_rejects"]), ("rejected answers", c["rejected"]),
                            ("no answer (rerun)", c["failed"]), ("repaired answers", c["repaired"])])),
        ("Queries per type", _bars(by_type) + f"<p>{summary['queries_per_caption']} queries per caption</p>"),
        ("Queries per grade", _bars(sorted(grade.items()))),
        ("Query length", _bars(hist) + "<p>" + html.escape(
            ", ".join(f"{k} {v}" for k, v in summary["query_chars"].items())) + " characters</p>"),
        ("Rejects by reason", _bars(list(summary["rejects_by_reason"].items()))),
    ]
    curation = manifest.get("curation")
    if curation:
        dropped = curation.get("stats", {}).get("dropped_by_reason", {})
        sections.append(("Curation: dropped by filter", _bars(sorted(dropped.items(), key=lambda kv: -kv[1]))))
        sections.append(("Curation", _table(sorted((k, v) for k, v in curation.get("stats", {}).items()
                                                   if not isinstance(v, dict)))))
    sample = "".join(
        f"<div class=cap><p><b>{html.escape(s['id'])}</b> {html.escape(s['text'])}</p><ul>"
        + "".join(f"<li><span class=t>{html.escape(q['type'])}</span> {html.escape(q['query'])}"
                  f" <span class=muted>g{q['grade']}</span></li>" for q in s["queries"]) + "</ul></div>"
        for s in summary["sample"])
    sections.append(("Sample", sample or "<p class=muted>no captions with queries</p>"))
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{b}</section>" for h, b in sections)
    return f"""<!doctype html><html lang=zh><meta charset=utf-8><title>capgen report</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}
section{{margin-bottom:1.5em}} h2{{font-size:16px;border-bottom:1px solid #ddd}} svg text{{font-size:12px}}
table{{border-collapse:collapse}} th{{text-align:left;padding-right:1em;font-weight:normal;color:#555}}
.cap{{display:inline-block;vertical-align:top;width:520px;margin:0 1em 1em 0}} .t{{color:#4a7bd0}}
.muted{{color:#888}} ul{{margin:0;padding-left:1.2em}}</style>
<h1>capgen report</h1>{body}</html>
"""
