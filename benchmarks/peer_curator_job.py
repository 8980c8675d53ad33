"""The curator side of benchmarks/peer_curator.py: capgen's job done with bespokelabs-curator.

Runs in curator's own virtual environment (not capgen's), as one process, timed from outside:

    /tmp/curator-venv/bin/python benchmarks/peer_curator_job.py --captions F --base-url URL \
        --model fake-model --concurrency 64 --work DIR --summary-out S.json

The same job as `python -m gen.run --engine openai`:
  - the same captions (the file capgen reads: JSON lines with id and text);
  - the same messages: rendered here, inside the timed process, by capgen's own
    gen.generate.prompts.PromptSet (imported from the repository: jinja2 and pydantic are in curator's
    environment too), and returned verbatim by `prompt()`;
  - the same schema: schemas.answer.CaptionQueries as curator's `response_format` (curator sends
    it as response_format json_schema, its own rendering of the schema: `$defs` not inlined,
    no "strict", and validates every answer against the model itself); `parse()` adds the one
    check that needs the caption (no query may repeat the whole caption: capgen validates with
    the caption as context) and flattens the answer into the same query rows as queries.parquet;
  - the same sampling parameters as capgen's defaults (temperature, top_p, max_tokens, seed,
    chat_template_kwargs enable_thinking false);
  - the same server and concurrency: backend "openai" with base_url, max_concurrent_requests =
    capgen's --concurrency, and rate limits set far above anything the server can do, so only
    the concurrency bounds it.

Offline and private by construction: telemetry off (TELEMETRY_ENABLED=false, read by
curator.telemetry at import), the hosted viewer off (CURATOR_VIEWER unset/0, no BESPOKE_API_KEY),
Hugging Face offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), litellm's model cost map local
(LITELLM_LOCAL_MODEL_COST_MAP), tiktoken's cl100k_base read from the copy litellm ships
(TIKTOKEN_CACHE_DIR; curator estimates tokens per request with it), curator's cache and HF datasets' cache in a fresh --work
directory (so nothing is skipped as cached). On top of that a guard refuses, and records, every
connection or DNS lookup that is not to the loopback address; the summary lists them, so a
run that tried to reach the internet says so.

One thing is patched, and said in the summary: with a base_url and a response_format curator
first probes the server (`client.beta.chat.completions.parse` with a `User{name, age}` model)
and refuses to run if the answer does not fit that model. The fake server answers every prompt
with a capgen answer, so the probe cannot succeed against it, while against a real vLLM server
it would. The patch still sends the probe (its cost stays in the wall time) and ignores the verdict.
"""
from __future__ import annotations

import os

# Before anything imports curator, litellm, posthog or datasets: they read these at import.
_OFFLINE_ENV = {
    "TELEMETRY_ENABLED": "false",       # bespokelabs.curator.telemetry.client
    "DO_NOT_TRACK": "1",
    "CURATOR_VIEWER": "0",              # bespokelabs.curator.client: no hosted viewer session
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "CURATOR_DISABLE_RICH_DISPLAY": "1",  # plain logging instead of a live rich table (no TTY here)
    "TQDM_DISABLE": "1",                  # ... and no tqdm bar either: capgen runs with --no-progress
}
for _k, _v in _OFFLINE_ENV.items():
    os.environ[_k] = _v
os.environ.pop("BESPOKE_API_KEY", None)


def _bundled_tiktoken_dir() -> str | None:
    """litellm ships tiktoken's cl100k_base file; curator's token estimate needs it offline."""
    import importlib.util
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "litellm_core_utils", "tokenizers")
    return d if os.path.isdir(d) else None


# Without it tiktoken downloads cl100k_base from openaipublic.blob.core.windows.net.
if _bundled_tiktoken_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = _bundled_tiktoken_dir()

import argparse  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- network guard

BLOCKED: list[str] = []


def _is_local(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


_orig_connect, _orig_connect_ex = socket.socket.connect, socket.socket.connect_ex
_orig_getaddrinfo = socket.getaddrinfo


def _check(address) -> None:
    if isinstance(address, tuple) and not _is_local(address[0]):
        BLOCKED.append(f"connect {address[0]}:{address[1]}")
        raise ConnectionRefusedError(f"benchmark guard: no connections off this machine ({address[0]})")


def _connect(self, address):
    _check(address)
    return _orig_connect(self, address)


def _connect_ex(self, address):
    _check(address)
    return _orig_connect_ex(self, address)


def _getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        BLOCKED.append(f"dns {host}")
        raise socket.gaierror(socket.EAI_NONAME, f"benchmark guard: no lookups of {host}")
    return _orig_getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex = _connect, _connect_ex
socket.getaddrinfo = _getaddrinfo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=Path, required=True)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default="fake-model")
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--work", type=Path, required=True, help="fresh directory: curator's cache and HF datasets' cache")
    ap.add_argument("--summary-out", type=Path, required=True)
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["CURATOR_CACHE_DIR"] = str(args.work / "curator")
    os.environ["HF_DATASETS_CACHE"] = str(args.work / "hf_datasets")
    os.environ["HF_HOME"] = str(args.work / "hf_home")
    os.environ.setdefault("OPENAI_API_KEY", "bench")

    sys.path.insert(0, str(ROOT))  # capgen's prompts and schema, the very same code
    from bespokelabs import curator
    from bespokelabs.curator.request_processor.online import openai_online_request_processor as oorp
    from gen.config import Sampling
    from gen.generate.prompts import PromptSet
    from schemas import Caption, CaptionQueries
    from schemas.text import normalize
    t_import = time.monotonic()

    probe: dict = {}
    _orig_probe = oorp.OpenAIOnlineRequestProcessor._check_structured_output_support_via_api

    def _probe_sent_verdict_ignored(self) -> bool:
        probe["verdict"] = _orig_probe(self)  # the request still goes to the server
        return True

    oorp.OpenAIOnlineRequestProcessor._check_structured_output_support_via_api = _probe_sent_verdict_ignored

    # The same input and messages as capgen: its own PromptSet, inside the timed process.
    prompts = PromptSet()
    rows = []
    with args.captions.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"id": r["id"], "text": r["text"],
                             "messages": prompts.messages(Caption(id=r["id"], text=r["text"]))})
    t_render = time.monotonic()

    class CaptionQueriesLLM(curator.LLM):
        def prompt(self, row):
            return row["messages"]

        def parse(self, row, response):
            # curator has already validated `response` against CaptionQueries, without a context;
            # the one check that needs the caption (schemas.answer._check_query: no query may
            # repeat the whole caption) is done here, so each answer is validated once, as in capgen.
            caption = normalize(row["text"])
            queries = response.queries()
            for q in queries:
                if normalize(q["query"]) == caption:
                    raise ValueError(f"query {q['query']!r} repeats the whole caption")
            return [{"caption_id": row["id"], **q} for q in queries]

    s = Sampling()
    llm = CaptionQueriesLLM(
        model_name=args.model,
        response_format=CaptionQueries,
        backend="openai",
        generation_params={"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                           "seed": s.seed, "chat_template_kwargs": {"enable_thinking": False}},
        backend_params={
            "base_url": args.base_url,
            "api_key": os.environ["OPENAI_API_KEY"],
            "max_concurrent_requests": args.concurrency,
            "max_requests_per_minute": 100_000_000,
            "max_tokens_per_minute": 100_000_000_000,
            "max_retries": 5,
            "request_timeout": 120,
        },
    )
    t_llm = time.monotonic()  # LLM(): includes curator's rate-limit probe request
    from datasets import Dataset
    dataset = Dataset.from_list(rows)  # the cheapest input curator takes (a list goes through from_generator)
    t_init = time.monotonic()
    result = llm(dataset)
    t_call = time.monotonic()

    ds = result.dataset
    caption_ids = ds["caption_id"] if len(ds) else []
    answered = len(set(caption_ids))
    stats = result.request_stats
    summary = {
        "curator_version": curator.__version__,
        "captions": len(rows),
        "captions_with_queries": answered,
        "queries": len(ds),
        "request_stats": {"total": stats.total, "succeeded": stats.succeeded, "failed": stats.failed,
                          "cached": stats.cached},
        "structured_output_probe_verdict": probe.get("verdict"),
        "blocked_network": BLOCKED,
        "timings": {"import_s": t_import - t0, "render_s": t_render - t_import, "llm_init_s": t_llm - t_render,
                    "dataset_s": t_init - t_llm, "call_s": t_call - t_init, "total_s": time.monotonic() - t0},
    }
    args.summary_out.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if answered == len(rows) else 3


if __name__ == "__main__":
    sys.exit(main())
