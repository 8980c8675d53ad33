"""report.html: what a person checks at a glance after a run, and the same numbers as data.

`Tally` counts the figures (queries per type and grade, lengths, rejects by reason, a sample
of captions with their queries) as the rows are exported, for the manifest; `render` draws them as one
self-contained HTML page with inline SVG charts: no scripts, no network, opens anywhere.
Every value from the data is escaped: captions are user text.
"""
from __future__ import annotations

import html
from collections import Counter
from typing import Any

from schemas import QUERY_TYPES

SAMPLE_CAPTIONS = 8
HIST_CAP = 25  # the histogram's last bar: queries this long or longer


class Tally:
    """The report's figures, counted while the exporter writes each row.

    Reading queries.parquet back afterwards cost memory that grew with the run (23% more at
    10x the captions) and a polars import; counting as the rows pass costs neither. Lengths
    are counted exactly per length, so the quantiles are exact too.
    """

    def __init__(self) -> None:
        self.captions = 0
        self.queries = 0
        self.by_type_grade: Counter = Counter()
        self.lengths: Counter = Counter()
        self.reasons: Counter = Counter()
        self.sample: list[dict[str, Any]] = []

    def rows(self, columns: dict[str, list]) -> None:
        """A batch of query rows as columns; counted in C (zip, map), not a frame per row."""
        self.queries += len(columns["query"])
        self.by_type_grade.update(zip(columns["type"], columns["grade"]))
        self.lengths.update(map(len, columns["query"]))

    def caption(self, caption_id: str, text: str, rows: list[dict[str, Any]]) -> None:
        """A caption with queries (its rows reach `rows` in the exporter's next batch)."""
        self.captions += 1
        if len(self.sample) < SAMPLE_CAPTIONS:
            order = sorted(rows, key=lambda r: (QUERY_TYPES.index(r["type"]) if r["type"] in QUERY_TYPES
                                                else 99, r["salience"]))
            self.sample.append({"id": caption_id, "text": text, "queries": [
                {"type": r["type"], "query": r["query"], "grade": r["grade"]} for r in order]})

    def queries_by_type(self) -> Counter:
        out: Counter = Counter()
        for (qtype, _), n in self.by_type_grade.items():
            out[qtype] += n
        return out

    def reject(self, reason: str) -> None:
        self.reasons[reason.split(":")[0].split(" (")[0]] += 1

    def _quantile(self, q: float) -> float:
        """The value at rank q * (n - 1), halves rounded up: polars' "nearest", as before."""
        return self._at(int(q * (self.queries - 1) + 0.5))

    def _at(self, rank: int) -> int:
        for length in sorted(self.lengths):
            rank -= self.lengths[length]
            if rank < 0:
                return length
        raise IndexError(rank)

    def summary(self) -> dict[str, Any]:
        n = self.queries
        chars: dict[str, Any] = {"mean": 0, "p50": None, "p90": None, "max": None}
        if n:
            mid = (self._at((n - 1) // 2) + self._at(n // 2)) / 2
            chars = {"mean": round(sum(k * v for k, v in self.lengths.items()) / n, 2), "p50": mid,
                     "p90": float(self._quantile(0.9)), "max": max(self.lengths)}
        hist: Counter = Counter()
        for length, count in self.lengths.items():
            hist[min(length, HIST_CAP)] += count
        return {
            "queries_by_type_and_grade": {f"{t}/{g}": c for (t, g), c in sorted(self.by_type_grade.items())},
            "query_chars": chars,
            "query_chars_histogram": {str(k): v for k, v in sorted(hist.items())},
            "queries_per_caption": round(n / self.captions, 2) if self.captions else 0,
            "rejects_by_reason": dict(self.reasons.most_common()),
            "sample": self.sample,
        }


def _bars(items: list[tuple[str, float]], unit: str = "") -> str:
    """Horizontal bars laid out by the browser (a grid, not SVG at fixed coordinates), so a
    long label wraps instead of being cut off at the page's edge."""
    if not items:
        return "<p class=muted>none</p>"
    top = max(v for _, v in items) or 1
    rows = "".join(f'<div class=bl>{html.escape(label)}</div><div class=bv>'
                   f'<span class=bar style="width:{80 * value / top:.1f}%"></span>'
                   f'<span class=n>{value:g}{unit}</span></div>' for label, value in items)
    return f"<div class=bars>{rows}</div>"


def _money(cost: Any) -> str:
    """What the run spent, in the unit its prices were given in, or why it is not known."""
    if not cost or cost.get("amount") is None:
        return "unknown (no prices set: --price-in, --price-out)"
    return (f"{cost['amount']:.4f} ({'batch' if cost.get('batch') else 'online'}: {cost['price_in_per_million']:g} "
            f"per million input tokens, {cost['price_out_per_million']:g} per million output tokens)")


def _table(rows: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


# Chinese needs a CJK font, which a page must name: browsers do not always fall back to one
# from system-ui, and then every Chinese character is an empty box.
FONTS = ('system-ui,"Noto Sans CJK SC","Noto Sans SC","Source Han Sans SC","PingFang SC",'
         '"Hiragino Sans GB","Microsoft YaHei","WenQuanYi Micro Hei",sans-serif')
CJK_NOTE = ("<p class=muted>Chinese shown as empty boxes means this machine has no CJK font: install "
            "one (Noto Sans CJK; on Debian and Ubuntu <code>apt-get install fonts-noto-cjk</code>).</p>")


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
                        ("prompt tokens", u["prompt_tokens"]), ("completion tokens", u["completion_tokens"]),
                        ("cost", _money(manifest.get("cost")))])),
        ("Captions", _bars([("with queries", c["captions_with_queries"]), ("from the store (cached)", c["cached"]),
                            ("rejected input lines", c["input_rejects"]), ("rejected answers", c["rejected"]),
                            ("rejected answers, valid queries kept", c["salvaged"]),
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
    sections.append(("Sample", (sample or "<p class=muted>no captions with queries</p>") + CJK_NOTE))
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{b}</section>" for h, b in sections)
    return f"""<!doctype html><html lang=zh><meta charset=utf-8><title>capgen report</title>
<style>body{{font:14px/1.4 {FONTS};margin:2em;max-width:1100px;color:#222}}
section{{margin-bottom:1.5em}} h2{{font-size:16px;border-bottom:1px solid #ddd}}
.bars{{display:grid;grid-template-columns:minmax(6em,max-content) minmax(200px,520px);gap:3px 8px;
align-items:center;font-size:12px}} .bl{{text-align:right;max-width:26em;overflow-wrap:anywhere}}
.bv{{display:flex;align-items:center;gap:4px}} .bar{{display:inline-block;height:16px;background:#4a7bd0}}
table{{border-collapse:collapse}} th{{text-align:left;padding-right:1em;font-weight:normal;color:#555}}
.cap{{display:inline-block;vertical-align:top;width:520px;margin:0 1em 1em 0}} .t{{color:#4a7bd0}}
.muted{{color:#888}} ul{{margin:0;padding-left:1.2em}}</style>
<h1>capgen report</h1>{body}</html>
"""
