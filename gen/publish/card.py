"""The dataset card (README.md) of a curated version: the YAML header dataset hubs read
(Hugging Face: license, language, task, one config per view with its files per split, and
their features), then in words where the data came from, what is in it and how to load it.
`datasets.load_dataset(<version dir>)` reads the header as it is.

Everything comes from the version's own files and manifest, and from the generation run's
manifest (captions file and digest, model, template digest, sampling)."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from gen.curate.config import CurateConfig
from gen.curate.shards import write_text

# name, folder prefix of its parquet shards, what a row is
VIEWS = (
    ("default", "", "one row per query: the query, its positive captions and hard negatives, ids and scores"),
    ("sentence-transformers", "st/", "anchor, positive, negative_1..k: one row per (query, positive)"),
)
SPLITS = ("train", "dev")
_TYPES = {pa.string(): "string", pa.large_string(): "string", pa.bool_(): "bool", pa.int8(): "int8",
          pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64", pa.float32(): "float32",
          pa.float64(): "float64"}


def write_card(version_dir: Path, run_dir: Path, config: CurateConfig, manifest: dict,
               generation: Optional[dict] = None, version: Optional[str] = None) -> None:
    """README.md in version_dir. generation: the run's manifest as gen.run builds it; None
    reads run_dir/manifest.json (a finished run being re-curated), if there is one.
    version: the shards version's name, when it is one."""
    if generation is None:
        try:
            generation = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            generation = {}
    write_text(render(Path(version_dir), config, manifest, generation, version), Path(version_dir) / "README.md")


def content_digest(manifest: dict) -> str:
    """sha256 over every data file's name and sha256: what the rows are, whatever the folder."""
    h = hashlib.sha256()
    for f in sorted(manifest.get("files", []), key=lambda f: f["file"]):
        h.update(f"{f['file']}\0{f.get('sha256', '')}\n".encode())
    return h.hexdigest()


def render(version_dir: Path, config: CurateConfig, manifest: dict, generation: dict,
           version: Optional[str] = None) -> str:
    files = _files_by_view(manifest)
    # `datasets` caches what it loaded under the folder's name and a hash of this header,
    # never of the files: every .../shards/latest on a machine shared one cache entry, and a
    # trainer got an older version's rows (or another run's) without a word. The header's
    # dataset_info is in that hash, so each config's description names the content.
    described = (f"capgen shards{' version ' + version if version else ''}; "
                 f"content sha256 {content_digest(manifest)}")
    header = {
        "license": config.dataset_license,
        "language": ["zh"],
        "task_categories": ["sentence-similarity", "text-retrieval"],
        "tags": ["capgen", "synthetic", "image-captions", "retrieval"],
        "size_categories": [_size_category(_rows(files["default"], "train") + _rows(files["default"], "dev"))],
        "pretty_name": _title(generation),
        "configs": [
            {"config_name": name, "data_files": [{"split": s, "path": [f["file"] for f in files[name][s]]}
                                                 for s in _loadable(files[name])],
             **({"default": True} if name == "default" else {})}
            for name, _, _ in VIEWS if any(files[name].values())
        ],
        "dataset_info": [{**(_info(version_dir, name, files[name]) or {"config_name": name}),
                          "description": described} for name, _, _ in VIEWS if any(files[name].values())],
    }
    return "---\n" + _yaml(header) + "---\n\n" + _body(version_dir, config, manifest, generation, files)


def _files_by_view(manifest: dict) -> dict[str, dict[str, list[dict]]]:
    out = {name: {s: [] for s in SPLITS} for name, _, _ in VIEWS}
    for f in manifest.get("files", []):
        folder, _, base = f["file"].rpartition("/")
        for name, prefix, _ in VIEWS:
            for split in SPLITS:
                if prefix == (folder + "/" if folder else "") and base.startswith(split + "-") \
                        and base.endswith(".parquet"):
                    out[name][split].append(f)
    return out


def _loadable(files: dict[str, list[dict]]) -> list[str]:
    """Splits with rows: `datasets` refuses a split whose files are all empty (dev_fraction 0).
    With no rows at all the train split stays, so loading says the data is empty rather than
    guessing other files."""
    return [s for s in SPLITS if _rows(files, s)] or ["train"]


def _rows(files: dict[str, list[dict]], split: str) -> int:
    return sum(f["rows"] for f in files[split])


def _info(version_dir: Path, name: str, files: dict[str, list[dict]]) -> Optional[dict]:
    present = [f for s in SPLITS for f in files[s]]
    if not present:
        return None
    # No `splits`: the hub wants their in-memory bytes, which only reading every shard tells;
    # the row counts are in the text below.
    features = _features(pq.read_schema(version_dir / present[0]["file"]))
    return None if features is None else {"config_name": name, "features": features}


def _feature(t: pa.DataType) -> Optional[Any]:
    if t in _TYPES:
        return _TYPES[t]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _feature(t.value_type)
        return None if inner is None else {"list": inner}
    return None


def _features(schema: pa.Schema) -> Optional[list[dict]]:
    """The hub's feature list, or None for a type it has no plain name for (the hub then
    reads the types from the files)."""
    out = []
    for field in schema:
        f = _feature(field.type)
        if f is None:
            return None
        out.append({"name": field.name, **({"dtype": f} if isinstance(f, str) else f)})
    return out


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1T")


def _title(generation: dict) -> str:
    source = generation.get("captions_file")
    return f"capgen queries for {Path(source).name}" if source else "capgen queries"


def _type_counts(version_dir: Path, files: dict[str, list[dict]]) -> dict[str, Counter]:
    out = {}
    for split in SPLITS:
        c: Counter = Counter()
        for f in files[split]:
            c.update(pq.read_table(version_dir / f["file"], columns=["type"]).column("type").to_pylist())
        out[split] = c
    return out


def _body(version_dir: Path, config: CurateConfig, manifest: dict, generation: dict,
          files: dict[str, dict[str, list[dict]]]) -> str:
    stats = manifest.get("stats", {})
    counts = generation.get("counts", {})
    L = [f"# {_title(generation)}", "",
         "Query-caption pairs for training embedding (retrieval) models, generated by capgen: an LLM",
         "asked, once per image caption, for the entities, events, conjunctions, conditions and",
         "summaries a searcher would type, then validated, deduplicated, filtered and given hard",
         "negatives. Texts are Chinese.", "",
         "## Source", ""]
    if generation:
        digest = generation.get("captions_sha256")
        L.append(f"- Captions: `{generation.get('captions_file', 'unknown')}`"
                 + (f" (sha256 `{digest}`)" if digest else "")
                 + (f", {counts['captions']} captions read, {counts.get('captions_with_queries', '?')} with queries"
                    if "captions" in counts else ""))
        L.append(f"- Model: `{generation.get('model', 'unknown')}`")
        L.append(f"- Prompt templates: digest `{generation.get('template_digest', 'unknown')}`")
        sampling = generation.get("sampling") or {}
        L.append("- Sampling: " + (", ".join(f"{k} {v}" for k, v in sampling.items()) or "unknown"))
        if generation.get("capgen_version"):
            L.append(f"- capgen {generation['capgen_version']}, answer fingerprint `{generation.get('fingerprint', '?')}`")
    else:
        L.append("- The generation run's manifest was not found: source, model and sampling unknown.")
    L.append(f"- Input to curation: {stats.get('queries_in', '?')} generated queries on "
             f"{stats.get('captions_in', '?')} captions")
    L += ["", "## Contents", "", "| split | query rows | (query, caption) pairs | sentence-transformers rows |",
          "|---|---|---|---|"]
    for split in SPLITS:
        s = stats.get("splits", {}).get(split, {})
        L.append(f"| {split} | {_rows(files['default'], split)} | {s.get('pairs', '?')} | "
                 f"{_rows(files['sentence-transformers'], split)} |")
    by_type = _type_counts(version_dir, files["default"])
    types = sorted(set(by_type["train"]) | set(by_type["dev"]), key=str)
    if types:
        L += ["", "Query rows per type:", "", "| type | train | dev |", "|---|---|---|"]
        L += [f"| {t} | {by_type['train'][t]} | {by_type['dev'][t]} |" for t in types]
    dropped = stats.get("dropped_by_reason") or {}
    if dropped:
        L += ["", "Generated queries left out, by reason (each with its record in `dropped.parquet`): "
              + ", ".join(f"{r} {n}" for r, n in dropped.items()) + "."]
    neg = stats.get("negatives_per_query") or {}
    if neg:
        L += ["", f"Hard negatives per query row: mean {neg.get('mean')}, min {neg.get('min')}, "
              f"max {neg.get('max')} ({stats.get('negatives_from_bm25', '?')} from BM25, "
              f"{stats.get('negatives_random_fill', '?')} guarded random fill)."]
    L += ["", "## Curation settings", "",
          f"Fingerprint `{manifest.get('fingerprint', config.fingerprint())}`; the settings that decide the rows",
          "(`python -m gen.curate --help` says what each does):", ""]
    L += [f"- `{k}`: `{json.dumps(v, ensure_ascii=False)}`" for k, v in
          manifest.get("settings", config.data_settings()).items()]
    L += ["", "## Files", "",
          "- `train-*.parquet`, `dev-*.parquet`: " + VIEWS[0][2],
          "- `st/{train,dev}-*.parquet`: " + VIEWS[1][2] + " (rows short of k negatives are left out)",
          "- `flag/{train,dev}-*.jsonl`: FlagEmbedding's `{\"query\", \"pos\", \"neg\", \"pos_scores\", \"neg_scores\", \"type\"}`",
          "- `beir/`: the dev split as an MTEB/BEIR retrieval set (corpus, queries, graded qrels)",
          "- `dropped.parquet`: every generated query not in a shard, with its reason",
          "- `manifest.json`: every file with rows and sha256, the settings, the statistics"]
    k = config.negatives
    train_flag = " ".join(f["file"] for f in manifest.get("files", [])
                          if f["file"].startswith("flag/train-")) or "flag/train-00000.jsonl"
    L += ["", "## Loading", "",
          "With `datasets` (the header above names the files of each split). Load this version's",
          "folder, `shards/<version>`, to train on a version that stays put; `shards/latest` works",
          "too: the header names this version's content, so `datasets` never serves an older one",
          "from its cache.", "",
          "```python", "from datasets import load_dataset",
          'rows = load_dataset("path/to/this/folder")                           # train and dev: query rows',
          'pairs = load_dataset("path/to/this/folder", "sentence-transformers")  # anchor, positive, negatives',
          "```", "",
          "sentence-transformers (in-batch and hard negatives):", "",
          "```python",
          "from datasets import load_dataset",
          "from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses",
          'train = load_dataset("path/to/this/folder", "sentence-transformers", split="train")',
          'model = SentenceTransformer("BAAI/bge-small-zh-v1.5")',
          "SentenceTransformerTrainer(model=model, train_dataset=train,",
          "                           loss=losses.MultipleNegativesRankingLoss(model)).train()",
          "```", "",
          "FlagEmbedding (its JSON lines, from this folder):", "",
          "```bash",
          "torchrun --nproc_per_node 1 -m FlagEmbedding.finetune.embedder.encoder_only.base \\",
          "    --model_name_or_path BAAI/bge-small-zh-v1.5 --output_dir out \\",
          f"    --train_data {train_flag} --train_group_size {k + 1}",
          "```"]
    L += ["", "## Licence", "",
          f"`{config.dataset_license}`, as set by whoever ran capgen (`--dataset-license`, or",
          "`dataset_license` under `[curation]` in the job file; `unknown` when unset). The rows",
          "quote the source captions and are written by the model named above: the captions' licence",
          "and the model's terms apply to them as well.", ""]
    return "\n".join(L)


def _yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars; strings as JSON (valid YAML) so no value
    can break the header."""
    pad = " " * indent
    if isinstance(value, dict):
        out = ""
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out += f"{pad}{k}:\n" + _yaml(v, indent + (0 if isinstance(v, list) else 2))
            else:
                out += f"{pad}{k}: {_scalar(v)}\n"
        return out
    if isinstance(value, list):
        out = ""
        for item in value:
            if isinstance(item, dict) and item:
                first, *rest = _yaml(item, indent + 2).splitlines(keepends=True)
                out += f"{pad}- {first[indent + 2:]}" + "".join(rest)
            elif isinstance(item, list) and item:
                out += f"{pad}-\n" + _yaml(item, indent + 2)
            else:
                out += f"{pad}- {_scalar(item)}\n"
        return out
    return f"{pad}{_scalar(value)}\n"


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return _UNREADABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(str(v), ensure_ascii=False))


# What JSON leaves raw and a YAML reader refuses (C1 controls, U+FFFE/FFFF: "unacceptable
# character"), reads as a line break (U+0085, U+2028, U+2029), or UTF-8 cannot hold (a lone
# surrogate: a file name of bytes that are not UTF-8). Escaped, the header reads back as written.
_UNREADABLE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")
