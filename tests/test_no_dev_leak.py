"""The benchmark's dev queries tune capgen but must never be inside it: no labelled query in
a bundled prompt, example or filter list (an independent half checks that gains generalise)."""
import json
import os
from pathlib import Path

import pytest

from gen.curate.config import DEFAULT_STOPLIST
from prompts import TEMPLATE_DIR

ROOT = Path(__file__).resolve().parents[1]
# As benchmarks/quality/run.sh finds them: $CAPGEN_DATA, else ../shared/ beside the checkout.
DEV = Path(os.environ.get("CAPGEN_DATA") or ROOT.parent / "shared/data/capretrieval") / "dev_queries.jsonl"
# the bundled templates and any template kept under benchmarks/
TEMPLATES = sorted([*TEMPLATE_DIR.glob("*.j2"), *(ROOT / "benchmarks").rglob("*.j2")])


@pytest.fixture(scope="module")
def dev_queries() -> set[str]:
    if not DEV.is_file():
        # The labelled queries stay outside the repository (docs/quality.md); only a machine
        # that has them beside the checkout can check that none leaked in.
        pytest.skip(f"CapRetrieval dev queries not found at {DEV} (kept outside the repository)")
    return {json.loads(line)["query"] for line in DEV.open(encoding="utf-8") if line.strip()}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dev_query_in_prompts(dev_queries, template):
    text = template.read_text(encoding="utf-8")
    assert not sorted(q for q in dev_queries if q in text)


def test_no_dev_query_in_filter_lists(dev_queries):
    assert not dev_queries & set(DEFAULT_STOPLIST)
