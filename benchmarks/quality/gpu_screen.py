"""Screen many training-pair variants on a GPU, several seeds each, in one call.

The fixed protocol (`python -m gen.eval finetune`) takes ~10 minutes a run on 2 CPU cores,
so a CPU affords a handful of runs and one seed each: too few to tell apart changes of
under a point. A GPU does one run in well under a minute, but a GPU machine may have
neither polars nor datasets, and what travels to it should be small. So the work is split:

    prep  (here, CPU): draws each variant's pairs with the protocol's own `sample`, writes
          them as small JSON lines, and stores m3e-small as fp16 safetensors (48 MB; the
          fp32 original is twice that);
    train (there, GPU): the same protocol in a plain torch loop (multiple negatives ranking
          loss, scale 20, cosine; batches with no repeated text; AdamW lr 2e-5, 10% linear
          warm-up then linear decay, gradient norm 1; one epoch; batch 32; 128 tokens) and
          the same nDCG@10 (`gen.eval.retrieval`).

`prep --hard-negatives` adds to each drawn pair its BM25 hard negative
(`gen/eval/hardneg.py`, the variant `gen.eval finetune --hard-negatives` trains), written as
a variant of its own (`NAME+hn`); train then scores each query against the batch's captions
and its negatives, as sentence-transformers' loss does with a third column. `train
--clean-batches` batches as `gen.eval finetune --clean-batches` does (gen/eval/batches.py).

Its figures compare only with each other (same call, same fp16-rounded start, zero-shot
included): a screen, not the protocol. A variant worth keeping is then confirmed on the CPU
with `gen.eval finetune`.

    python benchmarks/quality/gpu_screen.py prep --out .screen --seeds 0 1 2 \\
        --variant capgen=outputs/run/shards/latest --variant jieba=jieba.parquet
    python benchmarks/quality/gpu_screen.py train --dir .screen --corpus captions.jsonl \\
        --labels dev_queries.jsonl --results results.jsonl
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import random
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gen.eval.batches import plan  # noqa: E402
from gen.eval.labels import load_corpus, load_labels  # noqa: E402
from gen.eval.retrieval import evaluate  # noqa: E402

PAIRS, BATCH, LR, WARMUP, MAX_TOKENS, SCALE = 12_000, 32, 2e-5, 0.1, 128, 20.0


def prep(args) -> None:
    from gen.eval.finetune import m3e_small_path
    from gen.eval.pairs import load_pairs, sample

    out = Path(args.out)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(Path(args.corpus)) if args.hard_negatives else None
    for spec in args.variant:
        name, source = spec.split("=", 1)
        pool = load_pairs(Path(source))
        for seed in args.seeds:
            drawn = sample(pool, args.pairs, seed)
            if corpus is not None:
                from gen.eval.hardneg import attach
                drawn = attach(drawn, pool, corpus)
            tag = name + ("+hn" if args.hard_negatives else "")
            keep = [c for c in ("query", "caption_id", "neg_id") if c in drawn.columns]
            with gzip.open(out / "pairs" / f"{tag}.s{seed}.jsonl.gz", "wt", encoding="utf-8") as f:
                for row in drawn.select(keep).iter_rows(named=True):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {pool.unique(subset=['query', 'caption_id']).height} distinct pairs", flush=True)
    encoder = out / "m3e-small"
    if not (encoder / "model.safetensors").is_file():
        import shutil

        import torch
        from safetensors.torch import save_file
        src = m3e_small_path()
        encoder.mkdir(exist_ok=True)
        for f in src.iterdir():
            if f.suffix == ".json":
                shutil.copy(f, encoder / f.name)
        state = torch.load(src / "pytorch_model.bin", map_location="cpu")
        save_file({k: v.half().contiguous() for k, v in state.items()}, encoder / "model.safetensors")


def _texts(pair: dict, corpus: dict[str, str]) -> tuple[str, ...]:
    ids = [pair["caption_id"]] + ([pair["neg_id"]] if "neg_id" in pair else [])
    return (pair["query"], *(corpus[i] for i in ids))


def batches(pairs: list[dict], corpus: dict[str, str], rng: random.Random, clean: bool = False):
    """The protocol's batches (gen.eval.batches.plan): no text twice in a batch and, with
    clean, no caption containing another pair's query. Each batch a list of tuples (query,
    caption) or, with hard negatives, (query, caption, negative)."""
    texts = [_texts(p, corpus) for p in pairs]
    planned, _ = plan([t[0] for t in texts], [t[1:] for t in texts], BATCH, rng, clean)
    return [[texts[i] for i in batch] for batch in planned]


def load_model(encoder: Path, seed: int):
    # gen.eval.finetune.load_encoder, on the GPU: that module imports polars, which the
    # device machine does not have.
    import torch
    from sentence_transformers import SentenceTransformer

    random.seed(seed)
    torch.manual_seed(seed)
    model = SentenceTransformer(str(encoder), device="cuda" if torch.cuda.is_available() else "cpu")
    model.float()
    model.max_seq_length = MAX_TOKENS
    return model


def train_one(model, pairs: list[dict], corpus: dict[str, str], seed: int, clean: bool = False) -> None:
    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    todo = batches(pairs, corpus, rng, clean)
    steps, warm = len(todo), math.ceil(WARMUP * len(todo))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    for batch in todo:
        embed = []
        for texts in zip(*batch):
            feats = {k: v.to(model.device) if hasattr(v, "to") else v
                     for k, v in model.tokenize(list(texts)).items()}
            embed.append(F.normalize(model(feats)["sentence_embedding"], dim=-1))
        # Each query against every caption of the batch, and every hard negative if any.
        scores = SCALE * embed[0] @ torch.cat(embed[1:]).T
        loss = F.cross_entropy(scores, torch.arange(len(batch), device=scores.device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def train(args) -> None:
    import torch

    root = Path(args.dir)
    corpus = load_corpus(Path(args.corpus))
    labels = load_labels(Path(args.labels), corpus)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    common = {"date": date.today().isoformat(), "device": device, "screen": "gpu_screen.py"}

    def record(row: dict) -> None:
        row = common | row
        print(json.dumps({k: row[k] for k in ("name", "seed", "ndcg@10", "secs") if k in row}), flush=True)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    record({"name": "zero-shot", "secs": 0} | evaluate(load_model(root / "m3e-small", 0), corpus, labels))
    runs = [(f, *f.name.removesuffix(".jsonl.gz").rsplit(".s", 1)) for f in (root / "pairs").glob("*.jsonl.gz")]
    runs.sort(key=lambda r: (int(r[2]), r[1]))  # seed-major: cut short, every variant has its first seed
    for path, name, seed in runs:
        if args.only and name not in args.only:
            continue
        pairs = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
        t = time.time()
        model = load_model(root / "m3e-small", int(seed))
        train_one(model, pairs, corpus, int(seed), args.clean_batches)
        tag = name + ("+clean" if args.clean_batches else "")
        record({"name": tag, "seed": int(seed), "secs": round(time.time() - t, 1)} | evaluate(model, corpus, labels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", action="append", required=True, help="name=pairs source (gen.eval's --pairs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pairs", type=int, default=PAIRS, help="pairs drawn per run (the protocol's 12,000)")
    p.add_argument("--hard-negatives", action="store_true", help="add each pair's BM25 hard negative (needs --corpus)")
    p.add_argument("--corpus", help="captions (JSON lines), for --hard-negatives")
    t = sub.add_parser("train")
    t.add_argument("--dir", required=True)
    t.add_argument("--corpus", required=True)
    t.add_argument("--labels", required=True)
    t.add_argument("--results", required=True)
    t.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    t.add_argument("--clean-batches", action="store_true",
                   help="no caption in a batch that contains another pair's query (gen/eval/batches.py)")
    args = ap.parse_args()
    if args.cmd == "prep" and args.hard_negatives and not args.corpus:
        ap.error("--hard-negatives needs --corpus")
    prep(args) if args.cmd == "prep" else train(args)


if __name__ == "__main__":
    main()
