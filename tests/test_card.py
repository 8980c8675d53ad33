"""Every shard version carries a dataset card (README.md) that dataset hubs and `datasets` read."""
import json
import os
import subprocess
import sys
from collections import Counter

import polars as pl
import pytest
import yaml
from conftest import FIXTURES, ROOT, write_jsonl
from fake_openai import FakeOpenAI

from gen.atomic import sha256_file
from gen.cli import ConfigError, load_config
from gen.curate import CurateConfig
from gen.run import EXIT_OK, EXIT_USAGE, main


def card(version_dir) -> tuple[dict, str]:
    text = (version_dir / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.fixture(scope="module")
def published(tmp_path_factory, sample_captions_module):
    """A job file run through the real CLI against the fake server, with a licence and a dev split."""
    tmp = tmp_path_factory.mktemp("card")
    captions = write_jsonl(tmp / "caps.jsonl", sample_captions_module)
    job = tmp / "job.toml"
    job.write_text('captions = "caps.jsonl"\nout = "out"\n[curation]\ndev_fraction = 0.3\n'
                   'dataset_license = "cc-by-4.0"\n', encoding="utf-8")
    with FakeOpenAI() as fake:
        assert main(["--config", str(job), "--base-url", fake.base_url, "--model", "fake-model",
                     "--no-progress"]) == EXIT_OK
    out = tmp / "out"
    return captions, out, out / "shards" / os.readlink(out / "shards" / "latest")


@pytest.fixture(scope="module")
def sample_captions_module():
    # conftest's sample_captions, for a fixture shared by the module
    return [json.loads(line) for line in (FIXTURES / "captions_sample.jsonl").read_text(encoding="utf-8").splitlines()]


def test_card_header_names_licence_language_task_files_and_features(published):
    _, _, version = published
    header, _ = card(version)
    assert header["license"] == "cc-by-4.0" and header["language"] == ["zh"]
    assert {"sentence-similarity", "text-retrieval"} <= set(header["task_categories"])
    configs = {c["config_name"]: c for c in header["configs"]}
    assert configs["default"]["default"] is True
    manifest = json.loads((version / "manifest.json").read_text())
    written = {f["file"] for f in manifest["files"] if f["rows"]}
    for name, prefix in (("default", ""), ("sentence-transformers", "st/")):
        files = {d["split"]: d["path"] for d in configs[name]["data_files"]}
        assert set(files) == {"train", "dev"}
        for split, paths in files.items():
            assert paths == sorted(f for f in written if f.startswith(f"{prefix}{split}-") and f.endswith(".parquet"))
    info = {i["config_name"]: i for i in header["dataset_info"]}
    columns = pl.read_parquet(version / "train-00000.parquet").columns
    assert [f["name"] for f in info["default"]["features"]] == columns
    features = {f["name"]: f for f in info["default"]["features"]}
    assert features["query"] == {"name": "query", "dtype": "string"}
    assert features["pos"] == {"name": "pos", "list": "string"}
    assert features["neg_judged"] == {"name": "neg_judged", "list": "bool"}


def test_card_text_says_source_model_sampling_counts_settings_and_how_to_load(published):
    captions, out, version = published
    _, body = card(version)
    run = json.loads((out / "manifest.json").read_text())
    assert run["captions_sha256"] == sha256_file(captions)
    assert f"`{captions}` (sha256 `{sha256_file(captions)}`)" in body
    assert "40 captions read" in body
    assert "Model: `fake-model`" in body and f"digest `{run['template_digest']}`" in body
    assert "temperature 0.3, top_p 0.9" in body
    # counts per type and split, as the shards hold them
    for split in ("train", "dev"):
        types = Counter(pl.read_parquet(version / f"{split}-00000.parquet")["type"].to_list())
        assert types, split
        for t, n in types.items():
            line = next(x for x in body.splitlines() if x.startswith(f"| {t} |"))
            assert line.split(" | ")[1 if split == "train" else 2].strip(" |") == str(n)
    assert f"- `dev_fraction`: `0.3`" in body and run["curation"]["fingerprint"] in body
    assert 'load_dataset("path/to/this/folder", "sentence-transformers"' in body
    assert "SentenceTransformerTrainer" in body and "FlagEmbedding" in body
    assert "--train_group_size 8" in body          # 7 negatives + the positive
    assert "`cc-by-4.0`" in body


def test_datasets_loads_the_version_folder_as_it_is(published, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, _, version = published
    ds = datasets.load_dataset(str(version), cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"train", "dev"}
    for split in ("train", "dev"):
        shard = pl.read_parquet(version / f"{split}-00000.parquet")
        assert ds[split].column_names == shard.columns and len(ds[split]) == shard.height > 0
        assert ds[split][0]["query"] == shard["query"][0] and ds[split][0]["pos"] == shard["pos"][0].to_list()
    st = datasets.load_dataset(str(version), "sentence-transformers", cache_dir=str(tmp_path / "hf"))
    assert st["train"].column_names == ["anchor", "positive"] + [f"negative_{i}" for i in range(1, 8)]
    assert len(st["train"]) == pl.read_parquet(version / "st" / "train-00000.parquet").height


def test_a_version_without_dev_rows_loads_its_train_split(tmp_path, sample_captions):
    datasets = pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:20])
    job = tmp_path / "job.toml"
    job.write_text("[curation]\ndev_fraction = 0.0\n", encoding="utf-8")
    with FakeOpenAI() as fake:
        assert main(["--config", str(job), "--captions", str(path), "--out", str(tmp_path / "out"),
                     "--base-url", fake.base_url, "--model", "fake-model", "--no-progress"]) == EXIT_OK
    version = tmp_path / "out" / "shards" / "latest"
    header, body = card(version)
    assert header["license"] == "unknown" and "`unknown`" in body
    assert [d["split"] for d in header["configs"][0]["data_files"]] == ["train"]
    ds = datasets.load_dataset(str(version.resolve()), cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"train"} and len(ds["train"]) > 0


def test_recurating_a_finished_run_reads_its_manifest_for_the_card(published):
    _, out, first = published
    p = subprocess.run([sys.executable, "-m", "gen.curate", "--queries", str(out), "--negatives", "3",
                        "--dataset-license", "apache-2.0"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    second = out / "shards" / os.readlink(out / "shards" / "latest")
    assert second != first
    header, body = card(second)
    assert header["license"] == "apache-2.0" and "Model: `fake-model`" in body
    assert "--train_group_size 4" in body


def test_licence_flag_and_a_new_licence_makes_a_new_version(tmp_path):
    c = load_config(["--captions", "x.jsonl", "--dataset-license", "cc-by-sa-4.0"], env={})
    assert c.curation.dataset_license == "cc-by-sa-4.0"
    assert CurateConfig().dataset_license == "unknown"
    assert CurateConfig(dataset_license="mit").fingerprint() != CurateConfig().fingerprint()
    # the value goes into YAML and Markdown: an identifier, nothing that could break either
    for bad in ("cc by", "mit\nlicense: other", "", "x" * 65):
        with pytest.raises(ConfigError, match="dataset-license: expected a string matching"):
            load_config(["--captions", "x.jsonl", "--dataset-license", bad], env={})
    assert main(["--captions", str(tmp_path / "none.jsonl"), "--dataset-license", "a b"]) == EXIT_USAGE


def test_no_value_breaks_the_header():
    """A captions file's name is the card's pretty_name: whatever bytes it holds, the header
    is YAML that reads back as written."""
    from gen.publish.card import _yaml
    names = ["caps\x9f.jsonl", "a\x85b", "a\u2028b\u2029", "\ufffe\uffff", "bytes\udc80.jsonl", 'q"uo:te\n- x',
             "猫🐱", "\x7f"]
    header = _yaml({"pretty_name": names[0], "names": names, "nested": {"k": names[4]}})
    header.encode("utf-8")
    assert yaml.safe_load(header) == {"pretty_name": names[0], "names": names, "nested": {"k": names[4]}}
