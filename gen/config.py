"""Every setting of a generation run, and the fingerprint of the ones that change the data.

The fingerprint is defined here and nowhere else. It covers what determines an answer:
the model's identity, the template sources, the answer schemas (schemas.decoding_constraints)
and the sampling parameters; each answer's cache key adds the caption text (see `answer_key`).
It leaves out what only changes how fast or where the run goes: engine, concurrency,
timeouts, retries, paths, URLs. Repair rounds stay out too: an answer that validates in
k rounds is the same answer whenever k are allowed, and the store tells how many rounds
a rejected answer had (gen.store.KEPT).
So moving from the in-process engine to a server of the same model reuses every answer.
"""
from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gen import localmodel
from gen.curate.config import CurateConfig
from gen.settings import Float, Int, OptFloat, OptInt
from schemas.caption import MAX_CAPTION_CHARS


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # The ranges OpenAI's API and vLLM accept; outside them a server answers 400 on every request.
    temperature: Float = Field(0.3, ge=0, le=2)
    top_p: Float = Field(0.9, gt=0, le=1)
    # Room for ~30 queries in compact JSON; caps a model that loops inside the grammar.
    max_tokens: Int = Field(1024, ge=1)
    # None: send no seed. vLLM's CPU server crashes on a seeded request prefilled in chunks.
    seed: OptInt = Field(0, ge=-2**63, le=2**63 - 1)


# Defaults of publication (gen/publish/); here so that importing gen.config stays light.
KEEP_VERSIONS = 5
MIN_SHARE = 0.5


def base_url_problem(url: str) -> Optional[str]:
    """Why `url` cannot be a server's base URL, as words following it; None when it can.

    The API key goes wherever the base URL says, so nothing is guessed: an empty URL is not
    "the default". A user name and password in it are refused, not used: the key already
    fills the Authorization header, and a password in a URL shows in the process list, the
    logs and the manifest (the message shows it as ***).
    """
    if not url.strip():
        return "is empty"
    # Credentials hide before the last @ and in a query (?api-key=...): neither is shown.
    shown = repr(re.sub(r"[?#].*", "?***", re.sub(r"//.*@", "//***@", url), flags=re.S))
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        return f"{shown} is not a URL ({e})"
    if url != url.strip() or any(c.isspace() for c in url):
        return f"{shown} has white space in it"
    if parts.scheme not in ("http", "https"):
        return f"{shown} must start with http:// or https://"
    if not parts.hostname:
        return f"{shown} names no host"
    if parts.username is not None or parts.password is not None:
        return (f"{shown} carries a user name or password: capgen takes none in a URL; the API key "
                f"goes in the environment variable named by --api-key-env")
    if parts.query or parts.fragment:
        return f"{shown} has a query or fragment; a base URL ends at the path, e.g. http://host:8000/v1"
    return None


class Pricing(BaseModel):
    """Prices per million tokens, the user's own: none are shipped, so unset means unknown."""
    model_config = ConfigDict(extra="forbid")
    input: OptFloat = Field(None, ge=0)
    output: OptFloat = Field(None, ge=0)
    # What a batch API charges, as a share of the online price (0.5: half).
    batch_discount: Float = Field(0.5, ge=0, le=1)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    captions: Path
    out: Optional[Path] = None           # default: outputs/<captions file stem>/
    cache: Optional[Path] = None         # default: <out>/cache.sqlite
    engine: Literal["vllm", "openai"] = "vllm"
    model: str = localmodel.ALIAS
    # Several servers share the load (least outstanding requests first); see engines/pool.py.
    base_urls: list[str] = Field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    prompts: Optional[Path] = None       # a directory of templates replacing the bundled ones
    sampling: Sampling = Field(default_factory=Sampling)

    # Requests in flight; for vLLM the largest batch. At least the server's max_num_seqs (vLLM:
    # 256), or it idles in proportion: 64 against 256 slots ran 4.3x the limit (BENCHMARKS.md).
    concurrency: Int = Field(256, ge=1)
    executor: Literal["local", "ray"] = "local"
    # --executor ray: actors, each one engine (one vLLM replica) with `concurrency` in flight
    ray_actors: Int = Field(2, ge=1)
    # GPUs Ray gives each actor; none: vLLM's tensor x pipeline parallel size on a cluster with
    # GPUs, 0 on one without (the CPU build) or for --engine openai. See docs/ray.md.
    ray_gpus_per_actor: OptFloat = Field(None, ge=0)
    timeout: Float = Field(120.0, gt=0)  # seconds per request
    # Per request, for transient faults; capped where the backoffs' sum (2 ** attempt) would
    # no longer be a number.
    max_attempts: Int = Field(6, ge=1, le=100)
    retry_wait: Float = Field(1.0, ge=0)  # first backoff in seconds; doubles, with jitter, to 30 s
    # A hosted API's limits for the key (gen/engines/pacing.py), counted over `rate_window`
    # seconds: 60 for per minute; shorter where the provider counts per second.
    rpm: OptInt = Field(None, ge=1)
    tpm: OptInt = Field(None, ge=1)
    rate_window: Float = Field(60.0, gt=0, le=3600)
    pricing: Pricing = Field(default_factory=Pricing)
    # Requests after an invalid answer, each showing the model its error. The bundled 0.5B
    # model fixes about 1 answer in 70 this way (docs/quality.md): 0 saves those requests;
    # a larger model may earn more. Capped because each round is a full prompt again.
    repair_rounds: Int = Field(1, ge=0, le=5)
    disable_thinking: bool = True
    max_caption_chars: Int = Field(MAX_CAPTION_CHARS, ge=1)
    max_model_len: Int = Field(4096, ge=1)  # vLLM context: prompt ~1k tokens + answer
    # Passed to vLLM's engine arguments as they are (tensor_parallel_size, gpu_memory_utilization, ...): how
    # the engine runs, never what it answers, so they stay out of the fingerprint.
    vllm_args: dict[str, Any] = Field(default_factory=dict)
    strict: bool = False
    force: bool = False
    dry_run: bool = False
    # After generation, curate into versioned training shards (see gen/publish/).
    curate: bool = True
    curation: CurateConfig = Field(default_factory=CurateConfig)
    # Curated versions kept under <out>/shards/ (shards/latest's is never removed).
    keep_versions: Int = Field(KEEP_VERSIONS, ge=1)
    # A run whose captions (or a curation whose pairs) fall below this share of the previous
    # publication's is refused, the previous outputs kept (gen/publish/); 0 allows any.
    min_share_of_previous: Float = Field(MIN_SHARE, ge=0, le=1)
    log_format: Literal["text", "json"] = "text"
    progress: bool = True
    # False: the engine's own output (vLLM, torch, Ray) goes to <out>/engine.log, not the terminal.
    verbose: bool = False

    # Batch mode (gen/generate/batch.py): the server's batch API at about half the price, or, with
    # batch_dir, request files in a directory that a site's own queue answers. A run submits
    # what is new and returns (exit 4) unless `wait`; the next run collects.
    batch: bool = False
    wait: bool = False
    batch_cancel: bool = False
    batch_dir: Optional[Path] = None
    batch_window: str = Field("24h", pattern=r"^[1-9][0-9]{0,3}h$")
    # OpenAI's published limits per batch input file; lower them for providers with smaller ones.
    batch_max_requests: Int = Field(50_000, ge=1)
    batch_max_bytes: Int = Field(200_000_000, ge=1024)
    batch_poll: Float = Field(30.0, gt=0)   # with `wait`: first pause between polls; doubles to 10 min
    # Where an invalid batch answer's repair round goes: the next batch (the batch price, no
    # online server needed) or online at once (an answer a cycle sooner).
    batch_repair: Literal["batch", "online"] = "batch"

    @model_validator(mode="after")
    def _batch_needs_a_batch_api(self) -> "RunConfig":
        if self.batch_dir is not None or self.batch_cancel:
            self.batch = True
        if self.batch and self.batch_dir is None and self.engine != "openai":
            raise ValueError("batch mode needs an OpenAI-compatible server (--base-url) or --batch-dir")
        if self.batch and self.executor != "local":
            raise ValueError("batch mode runs on the local executor; drop --executor ray")
        return self

    @model_validator(mode="after")
    def _a_window_holds_a_request(self) -> "RunConfig":
        # The pacer admits rpm * rate_window / 60 requests a window: below one, none ever goes.
        if self.rpm is not None and self.rpm * self.rate_window < 60:
            raise ValueError(f"rpm ({self.rpm}) over a rate_window of {self.rate_window:g} s allows "
                             f"{self.rpm * self.rate_window / 60:.2g} requests a window, and none can go: "
                             f"raise rate_window to at least {60 / self.rpm:.3g} s, or leave it at 60")
        return self

    @model_validator(mode="after")
    def _answer_fits_context(self) -> "RunConfig":
        # vLLM refuses every request whose answer cannot fit; better said once, before loading.
        if self.engine == "vllm" and self.sampling.max_tokens >= self.max_model_len:
            raise ValueError(f"max_tokens ({self.sampling.max_tokens}) must be less than "
                             f"max_model_len ({self.max_model_len}), which also holds the prompt")
        return self

    @field_validator("base_urls")
    @classmethod
    def _base_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if problem := base_url_problem(url):
                raise ValueError(f"base URL {problem}")
        return urls

    @property
    def out_dir(self) -> Path:
        name = self.captions.name
        for packed in (".gz", ".zst", ".bz2", ".xz"):   # raw.jsonl.gz -> outputs/raw/, as raw.jsonl
            name = name.removesuffix(packed)
        return self.out or Path("outputs") / Path(name).stem

    @property
    def cache_path(self) -> Path:
        return self.cache or self.out_dir / "cache.sqlite"


def model_identity(model: str) -> str:
    """A name for the model that survives moving its files: a path is not an identity."""
    if model.startswith("local:"):
        return model
    path = Path(model)
    if path.is_dir():
        cfg = path / "config.json"
        digest = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else "noconfig"
        return f"dir:{path.name}:{digest}"
    return model


def generation_fingerprint(config: RunConfig, template_digest: str, schema: dict) -> str:
    parts = {
        "model": model_identity(config.model),
        "templates": template_digest,
        "schema": schema,
        "sampling": config.sampling.model_dump(),
    }
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def answer_key(fingerprint: str, caption_text: str) -> str:
    return hashlib.sha256(f"{fingerprint}\0{caption_text}".encode()).hexdigest()
