"""Curation benchmark: generated query records (10 per caption), synthesised from the real
CapRetrieval captions, through gen.curate.curate() in a child process; reports wall time,
the peak memory of the child's whole process tree (its jieba pool workers included) and the
share of time per step.

    python benchmarks/curate_bench.py                      # 1,000,000 records / 100,000 captions
    python benchmarks/curate_bench.py --small              # 20,000 records / 2,000 captions (CI)
    python benchmarks/curate_bench.py --size 5M --keep /work/bench-data/5M   # synthesise once, reuse
    python benchmarks/curate_bench.py --run-dir /work/bench-data/5M --code /work/bench-before \\
        --label before --max-rss-gib 16 --results /tmp/curate.jsonl

Synthesis: caption i is real caption i mod 1,512 (the even-numbered lines of the caption
file; the odd ones feed the evaluation set) with a numeric suffix, so texts differ
but, as in real data, the same things recur across captions. Queries are drawn from the
caption's own jieba words and spans in the answer schema's mix (entities, hypernyms from a
small list, events, conjunctions, conditions, summaries), with some exact, punctuation and
near duplicates and some generic queries, so every curation step has work to do.
The evaluation set for decontamination (10k texts; 500 with --small) is in-domain: clauses
of the odd-numbered real captions recombined (the common phrasing, but no benchmark
caption), plus 10 near copies (two characters changed) of benchmark captions, which must be
found; each also matches the ~65 other captions cut from the same real one.
The files are written in chunks of captions (one parquet row group each) from one random
sequence, so memory stays flat at any size and a size's files are the same at any chunk size.

Measurement: the parent synthesises (or reuses) the run, then starts the curation as a
child process (PYTHONPATH=--code, so another checkout can be measured on the same data) and
samples the RSS of the child and every descendant every 0.2 s: the peak of their sum is
"peak tree RSS". Forked pool workers share pages with the child, so that sum counts those
pages more than once; the PSS sum (sampled every 5 s) counts them once, and is what
--max-rss-gib watches. It and --max-wall-s kill the tree when crossed and report where
(in which curation step) it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "tests" / "fixtures" / "capretrieval_captions.jsonl"
HYPERNYMS = ("物品", "动物", "建筑", "交通工具", "食物", "人物", "植物", "电子产品", "文件", "家具",
             "风景", "服装", "商品", "标志", "工具")
GENERIC = ("图片", "这张照片", "画面")
QUERY_COLUMNS = ("caption_id", "query", "type", "subtype", "grade", "salience", "source")
SIZES = {"small": (2_000, 20_000, 500), "1M": (100_000, 1_000_000, 10_000),
         "5M": (500_000, 5_000_000, 10_000), "20M": (2_000_000, 20_000_000, 10_000)}
SYNTH_FORMAT = 2  # bump when the synthesis changes, so kept runs are not reused by mistake


def synthesise(run: Path, n_captions: int, n_records: int, n_eval: int, seed: int = 0,
               chunk: int = 20_000) -> dict:
    """Write queries.parquet, captions.parquet and eval.jsonl into run, chunk captions at a
    time; returns the counts. The files appear complete or not at all."""
    import jieba
    import pyarrow as pa
    import pyarrow.parquet as pq

    jieba.setLogLevel(60)
    base = _real_captions()[0::2]
    words = [[w for w in jieba.lcut(t) if w.strip() and not _punct(w)] for t in base]
    rng = random.Random(seed)
    per_caption = n_records / n_captions
    qschema = pa.schema([("caption_id", pa.string()), ("query", pa.string()), ("type", pa.string()),
                         ("subtype", pa.string()), ("grade", pa.int8()), ("salience", pa.int16()),
                         ("source", pa.string()), ("model", pa.string()), ("answer_key", pa.string())])
    cschema = pa.schema([("id", pa.string()), ("text", pa.string())])
    run.mkdir(parents=True, exist_ok=True)
    tmp_q, tmp_c = run / "queries.parquet.part", run / "captions.parquet.part"
    n_queries = 0
    with pq.ParquetWriter(tmp_q, qschema) as qw, pq.ParquetWriter(tmp_c, cschema) as cw:
        for start in range(0, n_captions, chunk):
            cols: dict[str, list] = {k: [] for k in QUERY_COLUMNS}

            def add(cid, q, typ, grade, sal, sub=None, src=None):
                for k, v in zip(cols, (cid, q, typ, sub, grade, sal, src)):
                    cols[k].append(v)

            ids, texts = [], []
            for i in range(start, min(start + chunk, n_captions)):
                b = i % len(base)
                cid, text, ws = f"bench.{i}", _caption_text(base, i), words[b]
                ids.append(cid)
                texts.append(text)
                nouns = [w for w in ws if len(w) >= 2] or ws or [text[:2]]
                budget = max(1, round(rng.gauss(per_caption, 1.5)))
                made = 0
                ents = rng.sample(nouns, min(len(nouns), 3))
                for s, e in enumerate(ents, 1):
                    add(cid, e, "entity", rng.choice((2, 2, 2, 1)), s,
                        rng.choice(("object", "person", "place", "concept")))
                made += len(ents)
                for s, e in enumerate(ents[:2], 1):
                    add(cid, rng.choice(HYPERNYMS), "hypernym", 2, s, "object", e)
                    made += 1
                spans = (("event", 2), ("conjunction", 0), ("simple_condition", 3), ("complex_condition", 5))
                for typ, n in spans:
                    if made >= budget - 2:
                        break
                    if typ == "conjunction":
                        q = "和".join(rng.sample(nouns, 2)) if len(nouns) >= 2 else nouns[0]
                    else:
                        a = rng.randrange(max(1, len(ws) - n + 1))
                        q = "".join(ws[a:a + n]) or nouns[0]
                    add(cid, q, typ, rng.choice((2, 1)), 1)
                    made += 1
                while made < budget:
                    a = rng.randrange(max(1, len(text) - 12))
                    add(cid, text[a:a + rng.randint(10, 22)], "summary", 2, made)
                    made += 1
                r = rng.random()
                if r < 0.10:      # punctuation / width variant of an entity: an exact duplicate
                    add(cid, f"“{ents[0]}”", "entity", 1, 9, "object")
                elif r < 0.15:    # one character more: a near duplicate of a longer query
                    q = cols["query"][-1]
                    add(cid, q + "的", cols["type"][-1], 1, 9)
                elif r < 0.18:
                    add(cid, rng.choice(GENERIC), "entity", 2, 9, "object")
            rows = len(cols["query"])
            n_queries += rows
            qw.write_table(pa.table({**cols, "model": ["bench"] * rows, "answer_key": ["bench"] * rows},
                                    schema=qschema))
            cw.write_table(pa.table({"id": ids, "text": texts}, schema=cschema))
            del cols, ids, texts
    assert n_queries > 0
    evals = synthesise_eval(n_captions, n_eval)
    (run / "eval.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in evals),
                                    encoding="utf-8")
    os.replace(tmp_q, run / "queries.parquet")
    os.replace(tmp_c, run / "captions.parquet")
    return {"captions": n_captions, "records_asked": n_records, "records": n_queries, "eval": n_eval,
            "seed": seed, "format": SYNTH_FORMAT}


def _caption_text(base: list[str], i: int) -> str:
    return f"{base[i % len(base)]}编号{i // len(base) + 1}"


def _real_captions() -> list[str]:
    return [json.loads(line)["text"] for line in CAPTIONS.open(encoding="utf-8")]


def synthesise_eval(n_captions: int, n: int, n_copies: int = 10, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    base = _real_captions()[1::2]
    clauses = [c for t in base for c in t.replace("。", "，").split("，") if len(c) >= 4]
    out = ["，".join(rng.sample(clauses, 3)) + "。" for _ in range(n - n_copies)]
    caps = _real_captions()[0::2]
    for i in rng.sample(range(n_captions), n_copies):
        chars = list(_caption_text(caps, i))
        for j in rng.sample(range(len(chars)), 2):
            chars[j] = "某"
        out.append("".join(chars))
    return out


def _punct(w: str) -> bool:
    return all(not c.isalnum() for c in w)


def prepare(args, n_caps: int, n_recs: int, n_eval: int, scratch: Path) -> tuple[Path, dict]:
    """The run directory to curate: --run-dir as it is, --keep reused when it holds this very
    synthesis (else synthesised there), otherwise synthesised into scratch."""
    if args.run_dir:
        meta_file = args.run_dir / "synth.json"
        return args.run_dir, json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    want = {"captions": n_caps, "records_asked": n_recs, "eval": n_eval, "seed": 0, "format": SYNTH_FORMAT}
    run = args.keep or scratch / "run"
    meta_file = run / "synth.json"
    if args.keep and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if {k: meta.get(k) for k in want} == want:
            print(f"reusing the synthesised run in {run}")
            return run, meta
        sys.exit(f"{run} holds another synthesis ({meta}); give another --keep folder")
    t0 = time.perf_counter()
    meta = synthesise(run, n_caps, n_recs, n_eval, chunk=args.chunk)
    meta["synth_s"] = round(time.perf_counter() - t0, 1)
    meta_file.write_text(json.dumps(meta))
    print(f"synthesised {meta['records']:,} records over {n_caps:,} captions into {run} in {meta['synth_s']} s")
    return run, meta


# --- the child: one curation, its result as JSON -------------------------------------------

def child(run: Path, out: Path, result: Path, workers: int, config_json: str) -> None:
    import resource
    from gen.curate import CurateConfig, curate

    extra = json.loads(config_json or "{}")
    eval_file = run / "eval.jsonl"
    if eval_file.is_file():
        extra.setdefault("decontaminate_against", [str(eval_file)])
    config = CurateConfig(workers=workers, **extra)
    _note_steps(result.with_suffix(".step"))
    t1, c1 = time.perf_counter(), time.process_time()
    manifest = curate(run, config, out_dir=out)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    ru_self = resource.getrusage(resource.RUSAGE_SELF)
    ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.write_text(json.dumps({
        "wall_s": wall, "cpu_s": cpu, "cpu_children_s": ru_kids.ru_utime + ru_kids.ru_stime,
        "maxrss_self_gib": ru_self.ru_maxrss / 2**20, "maxrss_largest_child_gib": ru_kids.ru_maxrss / 2**20,
        "stats": manifest.get("stats", {}), "timings_s": manifest.get("timings_s", {}),
        "config": json.loads(config.model_dump_json())}, ensure_ascii=False))


def _note_steps(path: Path) -> None:
    """Name the step under way in path, so a run the watchdog stops says where it was."""
    from gen.curate import pipeline

    timer = getattr(pipeline, "_Timer", None)
    if timer is None:
        return
    inner = timer.__call__

    def call(self, step, *a, **kw):
        path.write_text(step)
        return inner(self, step, *a, **kw)
    timer.__call__ = call


# --- the parent: start the child, watch its tree -------------------------------------------

def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict, cwd: Path, max_rss_gib: float, max_wall_s: float | None,
            step: Path | None = None, interval: float = 0.2) -> dict:
    """Run cmd; the peak RSS of its process tree and its wall time. step: the file where the
    child names the step under way."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    top = psutil.Process(proc.pid)
    peak = peak_pss = peak_main = peak_other = 0
    max_procs, last_pss, stopped, timeline = 1, 0.0, None, []
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in tree:
            try:
                rss = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            total += rss
            if p.pid == proc.pid:
                peak_main = max(peak_main, rss)
            else:
                peak_other = max(peak_other, rss)
        peak, max_procs = max(peak, total), max(max_procs, len(tree))
        now = time.perf_counter()
        over_rss = False
        # PSS costs the kernel a page-table walk (~20 ms of CPU per GiB): every 5 s, and
        # before a kill, since the summed RSS counts pages a forked worker shares twice.
        if now - last_pss >= 5.0 or (total > max_rss_gib * 2**30 and now - last_pss >= 1.0):
            last_pss = now
            pss = sum(_pss_kib(p.pid) for p in tree) * 1024
            peak_pss, over_rss = max(peak_pss, pss), pss > max_rss_gib * 2**30
        if not timeline or now - t0 >= timeline[-1][0] + 10:
            timeline.append((round(now - t0, 1), round(total / 2**30, 2)))
        over_wall = max_wall_s is not None and now - t0 > max_wall_s
        if over_rss or over_wall:
            what = f"{pss / 2**30:.1f} GiB PSS" if over_rss else f"the {max_wall_s:.0f} s limit"
            stopped = f"stopped at {what} ({total / 2**30:.1f} GiB tree RSS) after {now - t0:.0f} s"
            _kill_tree(proc.pid, tree)
            break
        time.sleep(interval)
    rc = proc.wait()
    if stopped and step and step.is_file():
        stopped += f", in step {step.read_text()}"
    return {"rc": rc, "stopped": stopped, "process_wall_s": time.perf_counter() - t0,
            "peak_tree_rss_gib": peak / 2**30, "peak_tree_pss_gib": peak_pss / 2**30,
            "peak_main_rss_gib": peak_main / 2**30, "peak_worker_rss_gib": peak_other / 2**30,
            "max_processes": max_procs, "rss_every_10s": timeline}


def _kill_tree(pid: int, tree) -> None:
    # The child leads its own session: the group takes the pool workers with it; any
    # descendant that left the group is killed by its id.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except Exception:  # already gone
            pass


def _commit(code: Path) -> str | None:
    r = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0:
        dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "")
    marker = code / ".commit"  # an exported tree (git archive) names its commit here
    return marker.read_text().strip() if marker.is_file() else None


def report(res: dict, meta: dict) -> None:
    m = res.get("result")
    print(f"load average:      {res['load_before']:.2f} before, {res['load_after']:.2f} after")
    print(f"code:              {res['code']} ({res['commit']}); config {res['config_json'] or '{}'}")
    if res["stopped"] or m is None:
        print(f"NOT FINISHED:      {res['stopped'] or 'the child exited ' + str(res['rc'])}; "
              f"peak tree RSS {res['peak_tree_rss_gib']:.2f} GiB")
        return
    st = m["stats"]
    wall, recs = m["wall_s"], st.get("queries_in", 0)
    sp = st.get("splits", {})
    print(f"records in:        {recs:,} over {st.get('captions_in', 0):,} captions")
    print(f"pairs out:         {st.get('pairs_out', 0):,}; query rows train {sp.get('train', {}).get('query_rows', 0):,}, "
          f"dev {sp.get('dev', {}).get('query_rows', 0):,}")
    npq = st.get("negatives_per_query", {})
    print(f"negatives / query: mean {npq.get('mean')}, min {npq.get('min')}; "
          f"{st.get('negatives_from_bm25', 0):,} from BM25, {st.get('negatives_random_fill', 0):,} random fill "
          f"(backend {', '.join(st.get('bm25_backend', []))})")
    print(f"dropped:           {json.dumps(st.get('dropped_by_reason', {}), ensure_ascii=False)}")
    dc = st.get("decontamination", {})
    if dc:
        print(f"decontamination:   {dc.get('captions_dropped', 0):,} captions dropped against "
              f"{dc.get('eval_texts', 0):,} eval texts ({dc.get('pairs_scored', 0):,} ROUGE-L pairs scored)")
    print(f"curation wall:     {wall:.1f} s ({wall / max(recs, 1) * 1e6:.1f} s per million records); "
          f"child process {res['process_wall_s']:.1f} s; CPU {m['cpu_s']:.1f} s + {m['cpu_children_s']:.1f} s pool workers")
    print(f"peak tree RSS:     {res['peak_tree_rss_gib']:.2f} GiB (sum over {res['max_processes']} processes at most; "
          f"PSS {res['peak_tree_pss_gib']:.2f} GiB, sampled every 5 s); child alone {res['peak_main_rss_gib']:.2f} GiB, "
          f"largest worker {res['peak_worker_rss_gib']:.2f} GiB")
    steps = {k: v for k, v in m["timings_s"].items() if k != "total"}
    peak = st.get("peak_rss_gib_after_step", {})
    print("time per step (in pipeline order; peak RSS of the child once the step is done):")
    for k, v in steps.items():
        if isinstance(v, (int, float)):
            print(f"  {k:<18} {v:7.2f} s  {100 * v / wall:5.1f} %   peak {peak.get(k, 0):5.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="20k records over 2k captions")
    p.add_argument("--size", choices=[k for k in SIZES if k != "small"], default="1M",
                   help="records (10 per caption): 1M, 5M or 20M")
    p.add_argument("--captions", type=int)
    p.add_argument("--records", type=int)
    p.add_argument("--eval", type=int, help="evaluation texts to decontaminate against")
    p.add_argument("--chunk", type=int, default=20_000, help="captions per parquet row group written")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", type=Path, help="synthesise the run here once; later runs with the same size reuse it")
    p.add_argument("--run-dir", type=Path, help="curate this existing run (synthesise nothing)")
    p.add_argument("--synth-only", action="store_true", help="synthesise (into --keep) and stop")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose gen.curate runs (default: this one)")
    p.add_argument("--config-json", default="", help="extra CurateConfig fields, as a JSON object")
    p.add_argument("--max-rss-gib", type=float, default=16.0,
                   help="kill the curation when its tree holds more (PSS: shared pages counted once)")
    p.add_argument("--max-wall-s", type=float, help="kill the curation after this many seconds")
    p.add_argument("--out", type=Path, help="write the shards here and keep them (default: a temporary folder)")
    p.add_argument("--label", default="", help="name of this run in --results")
    p.add_argument("--results", type=Path, help="append this run's figures to this JSON lines file")
    p.add_argument("--child", nargs=3, metavar=("RUN", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        run, out, result = map(Path, args.child)
        child(run, out, result, args.workers, args.config_json)
        return

    d_caps, d_recs, d_eval = SIZES["small" if args.small else args.size]
    n_caps, n_recs, n_eval = args.captions or d_caps, args.records or d_recs, args.eval or d_eval
    code = args.code.resolve()
    if args.config_json:
        json.loads(args.config_json)  # a typo fails here, not after the synthesis
    # Scratch (the shards, the parts) beside the kept run: same disk, and /tmp may be small.
    near = (args.keep or args.run_dir).resolve().parent if (args.keep or args.run_dir) else None
    if near:
        near.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="curate-bench-", dir=near))
    try:
        run, meta = prepare(args, n_caps, n_recs, n_eval, scratch)
        if args.synth_only:
            return
        out = args.out or scratch / "shards"
        result = scratch / "result.json"
        env = {**os.environ, "PYTHONPATH": str(code)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(run), str(out), str(result),
               "--workers", str(args.workers), "--config-json", args.config_json]
        load_before = os.getloadavg()
        res = measure(cmd, env, code, args.max_rss_gib, args.max_wall_s, result.with_suffix(".step"))
        res.update(load_before=load_before[0], load_after=os.getloadavg()[0], code=str(code),
                   commit=_commit(code), config_json=args.config_json, label=args.label,
                   date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), synth=meta,
                   result=json.loads(result.read_text()) if result.is_file() else None)
        report(res, meta)
        if args.results:
            with args.results.open("a", encoding="utf-8") as f:
                f.write(json.dumps(res, ensure_ascii=False) + "\n")
        if res["stopped"] is None and res["rc"] != 0:
            sys.exit(f"the curation exited {res['rc']}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
