"""Publication under the mistakes and accidents a scheduled job meets: a trainer loading
shards/latest, an --out in the wrong place, a wrong captions file for prune, a server down
for a whole rerun, files that cannot be deleted, damaged or left-over pointer files."""
import json
import os
from pathlib import Path

import pytest
import test_publish_safety as safety
from conftest import write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, main

cli, synthetic, snapshot, leftovers = safety.cli, safety.synthetic, safety.snapshot, safety.leftovers


def latest(out: Path) -> Path:
    return out / "shards" / "latest"


# --- loading shards/latest with `datasets` ---------------------------------------------------

def test_datasets_loads_the_new_rows_of_latest_after_a_rerun(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(60))
    out, cache = tmp_path / "out", str(tmp_path / "hf")
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        first = datasets.load_dataset(str(latest(out)), cache_dir=cache)["train"].num_rows
        write_jsonl(path, synthetic(90))   # the same file names, more rows in them
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
    version = out / "shards" / os.readlink(latest(out))
    expected = json.loads((version / "manifest.json").read_text())["stats"]["splits"]["train"]["query_rows"]
    assert datasets.load_dataset(str(latest(out)), cache_dir=cache)["train"].num_rows == expected != first
    assert datasets.load_dataset(str(version), cache_dir=cache)["train"].num_rows == expected
