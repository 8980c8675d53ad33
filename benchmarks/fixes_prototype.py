"""capgen with the fixes recommended in BENCHMARKS.md patched in at run time: evidence only.

    FIX=http,norm,export,report .venv/bin/python benchmarks/gen_bench.py \
        --capgen-cmd ".venv/bin/python benchmarks/fixes_prototype.py"

Runs `gen.run.main` after replacing, in memory, the pieces the generation benchmark found
slow. Nothing under gen/ is edited; once the fixes are applied there, delete this file.
FIX (comma list, default all):
  http    OpenAIEngine._once over one bare aiohttp session (json.dumps body, json.loads reply)
          instead of the openai SDK on httpx: 3.2 -> 0.4 ms CPU per request (client_cost.py).
          Happy path only (no status mapping, no option step-down): not for real servers.
  norm    schemas.answer's normalize() memoised, so the caption is normalised once per answer
          instead of once per query: parse_answer 0.23 -> 0.08 ms per caption.
  export  gen.export.export building column lists and pa.Table.from_pydict, without a
          QueryRecord model per query row: 0.19-0.25 -> 0.10 ms per caption.
  report  gen.report.summarize on lazy polars scans (aggregates only, plus the sample
          captions' rows) instead of reading queries.parquet whole and listing every length.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIX = set(filter(None, os.environ.get("FIX", "http,norm,export,report").split(",")))


def patch_http() -> None:
    import aiohttp

    from gen.engines import openai as eng
    from gen.engines.base import Completion
    from gen.engines.retry import EmptyAnswer

    async def _once(self, messages):
        server = self.pool.pick()
        self.pool.started(server)
        try:
            if not hasattr(self, "_session"):
                key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            url = server.url.rstrip("/") + "/chat/completions"
            kw = self._request(messages)
            body = {**kw, **kw.pop("extra_body", {})}
            self.attempts += 1
            async with self._session.post(url, data=json.dumps(body, ensure_ascii=False).encode()) as r:
                data = json.loads(await r.read())
                if r.status != 200:
                    raise RuntimeError(f"prototype: HTTP {r.status}: {str(data)[:200]}")
        finally:
            self.pool.finished(server, True)
        if not data.get("choices"):
            raise EmptyAnswer("server answered 200 with no choices")
        choice, usage = data["choices"][0], data.get("usage") or {}
        msg = choice["message"]
        return Completion(text=msg.get("content") or msg.get("reasoning_content") or msg.get("reasoning") or "",
                          prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0),
                          refusal=msg.get("refusal"), finish_reason=choice.get("finish_reason"))

    close = eng.OpenAIEngine.aclose

    async def aclose(self):
        if hasattr(self, "_session"):
            await self._session.close()
        await close(self)

    eng.OpenAIEngine._once, eng.OpenAIEngine.aclose = _once, aclose


def patch_norm() -> None:
    import schemas.answer as answer
    import schemas.text as text
    answer.normalize = functools.lru_cache(maxsize=64)(text.normalize)


def patch_export() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import gen.export as ex
    import gen.run as run
    from gen.atomic import atomic_path
    from gen.config import answer_key
    from schemas import CaptionQueries, Reject

    def export(records, *, store, fingerprint, model, out_dir, failures):
        stats = ex.ExportStats()
        qnames = [f.name for f in ex.QUERY_SCHEMA]
        with atomic_path(out_dir / "queries.parquet") as qpath, \
             atomic_path(out_dir / "captions.parquet") as cpath, \
             atomic_path(out_dir / "rejects.jsonl") as rpath:
            qw = pq.ParquetWriter(str(qpath), ex.QUERY_SCHEMA, compression="zstd")
            cw = pq.ParquetWriter(str(cpath), ex.CAPTION_SCHEMA, compression="zstd")
            q = {k: [] for k in qnames}
            c = {"id": [], "text": [], "extra": []}

            def flush(force: bool = False) -> None:
                nonlocal q, c
                if q["query"] and (force or len(q["query"]) >= ex.BATCH_ROWS):
                    qw.write_table(pa.Table.from_pydict(q, schema=ex.QUERY_SCHEMA))
                    q = {k: [] for k in qnames}
                if c["id"] and (force or len(c["id"]) >= ex.BATCH_ROWS):
                    cw.write_table(pa.Table.from_pydict(c, schema=ex.CAPTION_SCHEMA))
                    c = {"id": [], "text": [], "extra": []}

            with rpath.open("w", encoding="utf-8") as rejects:
                def reject(r: Reject) -> None:
                    stats.rejects[r.stage] += 1
                    rejects.write(json.dumps(r.model_dump(), ensure_ascii=False) + "\n")

                for record in records:
                    if isinstance(record, Reject):
                        reject(record)
                        continue
                    key = answer_key(fingerprint, record.text)
                    stored = store.get(key)
                    if stored is None:
                        why = failures.get(key, "not generated in this run")
                        reject(Reject(stage="generation", caption_id=record.id,
                                      reason=f"no answer ({why}); a rerun will ask again"))
                        continue
                    if stored.status != "ok":
                        reject(Reject(stage="generation", caption_id=record.id, reason=stored.reason,
                                      raw=stored.raw))
                        continue
                    c["id"].append(record.id)
                    c["text"].append(record.text)
                    c["extra"].append(json.dumps(record.extra, ensure_ascii=False) if record.extra else None)
                    for row in CaptionQueries.model_validate_json(stored.answer).queries():
                        q["caption_id"].append(record.id)
                        q["model"].append(model)
                        q["answer_key"].append(key)
                        for k in ("query", "type", "subtype", "grade", "salience", "source"):
                            q[k].append(row[k])
                        stats.queries += 1
                        stats.queries_by_type[row["type"]] += 1
                    stats.captions_with_queries += 1
                    flush()
            flush(force=True)
            qw.close()
            cw.close()
        return stats

    run.export = export


def patch_report() -> None:
    from collections import Counter

    import polars as pl
    import pyarrow.parquet as pq

    import gen.report as rep

    def summarize(out_dir: Path) -> dict:
        qs = pl.scan_parquet(out_dir / "queries.parquet")
        n = pl.col("query").str.len_chars()
        by_type_grade = {(t, g): c for t, g, c in qs.group_by("type", "grade").len().collect().iter_rows()}
        st = qs.select(n.mean().alias("mean"), n.median().alias("p50"), n.quantile(0.9).alias("p90"),
                       n.max().alias("max"), pl.len().alias("rows")).collect().row(0, named=True)
        hist = dict(qs.select(n.clip(upper_bound=25).alias("n")).group_by("n").len().collect().iter_rows())
        reasons: Counter = Counter()
        with (out_dir / "rejects.jsonl").open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    reasons[json.loads(line)["reason"].split(":")[0].split(" (")[0]] += 1
        caps = (pl.scan_parquet(out_dir / "captions.parquet").select("id", "text")
                .head(rep.SAMPLE_CAPTIONS).collect())
        n_caps = pq.ParquetFile(out_dir / "captions.parquet").metadata.num_rows
        sq = (qs.filter(pl.col("caption_id").is_in(caps["id"].to_list()))
              .select("caption_id", "type", "query", "grade", "salience").collect())
        sample = []
        for cid, text in caps.iter_rows():
            rows = sq.filter(pl.col("caption_id") == cid).select("type", "query", "grade", "salience").rows()
            rows.sort(key=lambda r: (rep.QUERY_TYPES.index(r[0]) if r[0] in rep.QUERY_TYPES else 99, r[3]))
            sample.append({"id": cid, "text": text,
                           "queries": [{"type": t, "query": s, "grade": g} for t, s, g, _ in rows]})
        return {
            "queries_by_type_and_grade": {f"{t}/{g}": c for (t, g), c in sorted(by_type_grade.items())},
            "query_chars": {"mean": round(st["mean"] or 0, 2), "p50": st["p50"], "p90": st["p90"],
                            "max": st["max"]},
            "query_chars_histogram": {str(k): v for k, v in sorted(hist.items())},
            "queries_per_caption": round(st["rows"] / n_caps, 2) if n_caps else 0,
            "rejects_by_reason": dict(reasons.most_common()),
            "sample": sample,
        }

    rep.summarize = summarize


if __name__ == "__main__":
    for name in ("http", "norm", "export", "report"):
        if name in FIX:
            globals()[f"patch_{name}"]()
    from gen.run import main
    sys.exit(main(sys.argv[1:]))
