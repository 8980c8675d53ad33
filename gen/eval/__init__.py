"""Measure what generated queries do for a retriever (`python -m gen.eval`, see docs/quality.md).

    labels.py      a labelled retrieval set: corpus captions + queries with graded positives
    coverage.py    share of strong (query, caption) pairs whose caption got a matching query
    pairs.py       training pairs from a capgen run, a baseline, or a file; the fixed sampling
    retrieval.py   nDCG@10 (linear gains) of an encoder on the labelled set
    finetune.py    the fixed fine-tuning protocol (m3e-small, in-batch negatives)
    hardneg.py     a BM25 hard negative per pair (a protocol variant)
    batches.py     which pairs may share a batch; clean batches (a protocol variant)
    baselines.py   pairs that need no LLM: jieba nouns and verbs of each caption

An evaluation tool, not part of the pipeline: sentence-transformers and the encoder are
optional (`pip install -e '.[eval]'`, see docs/quality.md), and nothing under gen/ other
than this package imports them.
"""
