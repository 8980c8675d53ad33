"""nDCG@10 of an encoder on a labelled set: linear gains (the grade), cosine similarity,
the whole corpus as candidates. The ideal ranking puts every labelled positive first."""
from __future__ import annotations

import math
from collections import defaultdict

from gen.eval.labels import LabelledQuery

K = 10


def ndcg_at_k(ranked: list[str], positives: dict[str, int], k: int = K) -> float:
    dcg = sum(positives.get(cid, 0) / math.log2(i + 2) for i, cid in enumerate(ranked[:k]))
    ideal = sorted(positives.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def evaluate(model, corpus: dict[str, str], labels: list[LabelledQuery], batch_size: int = 64) -> dict:
    """model: a sentence-transformers model (anything with .encode)."""
    import torch

    ids = list(corpus)
    docs = model.encode([corpus[i] for i in ids], batch_size=batch_size, convert_to_tensor=True,
                        normalize_embeddings=True)
    queries = model.encode([q.query for q in labels], batch_size=batch_size, convert_to_tensor=True,
                           normalize_embeddings=True)
    top = torch.topk(queries @ docs.T, k=min(K, len(ids)), dim=1).indices.tolist()
    scores = [ndcg_at_k([ids[j] for j in row], q.positives) for row, q in zip(top, labels)]
    by_type: dict[str, list[float]] = defaultdict(list)
    for q, s in zip(labels, scores):
        by_type[q.type].append(s)
    return {
        "ndcg@10": round(100 * sum(scores) / len(scores), 2),
        "queries": len(scores),
        "by_type": {t: round(100 * sum(v) / len(v), 2) for t, v in sorted(by_type.items())},
    }
