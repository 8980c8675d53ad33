from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# All 3,024 CapRetrieval captions, kept in the repository (fixtures/README.md).
CAPRETRIEVAL_CAPTIONS = FIXTURES / "capretrieval_captions.jsonl"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/fake_openai.py


@pytest.fixture
def eval_encoder() -> Path:
    """m3e-small's folder. The evaluation parts are opt-in (CAPGEN_EVAL=1 bash scripts/setup.sh):
    without them a test that needs them skips, unless CAPGEN_EVAL says they were installed (CI)."""
    from gen.eval.finetune import EncoderMissing, check_installed
    try:
        return check_installed()
    except EncoderMissing as e:
        if os.environ.get("CAPGEN_EVAL", "").lower() not in ("", "0", "no", "false"):
            pytest.fail(f"CAPGEN_EVAL is set, yet {e}")
        pytest.skip(str(e))


@pytest.fixture
def sample_captions() -> list[dict]:
    with (FIXTURES / "captions_sample.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module. Its workers must import this checkout's gen
    and the tests' modules (the stand-in engine), not whatever capgen the interpreter has
    installed; they inherit this environment."""
    ray = pytest.importorskip("ray")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [saved])])
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved
