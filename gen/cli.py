"""Command line, config file and environment -> one validated RunConfig.

Precedence, lowest first: RunConfig's defaults, the TOML file (`--config job.toml`), the
environment (`CAPGEN_MODEL=...`, `CAPGEN_BASE_URLS=url1,url2`, `CAPGEN_TEMPERATURE=...`),
then flags. So a scheduled job is one file plus one command, and any setting can still be
overridden for a single run. Relative paths in the file are relative to the file.
"""
from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from gen.config import RunConfig, Sampling, base_url_problem

PATH_FIELDS = ("captions", "out", "cache", "prompts")
SAMPLING_FIELDS = tuple(Sampling.model_fields)
# Curation settings reachable by flag; the rest go in the file's [curation] table.
CURATION_FLAGS = ("decontaminate_against",)


class ConfigError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    d, s = RunConfig.model_fields, Sampling()
    S = argparse.SUPPRESS  # an absent flag must not override the file or the environment
    ap = argparse.ArgumentParser(prog="python -m gen.run", argument_default=S,
                                 description="Generate entity- and event-level queries for captions.")
    a = ap.add_argument
    a("--config", type=Path, help="TOML file with any of the settings below (flags win)")
    a("--captions", type=Path, help="JSON lines (plain, gzip, zstd, bz2 or xz) or parquet with id and text (required here or in the config)")
    a("--out", type=Path, help="output directory (default: outputs/<captions stem>/)")
    a("--cache", type=Path, help="answer store (default: <out>/cache.sqlite); share it across outputs to reuse answers")
    a("--engine", choices=["vllm", "openai"], help="default: openai when a base URL is given, else vllm")
    a("--model", help=f"model name or path (default: {d['model'].default}, the bundled local model)")
    a("--base-url", dest="base_urls", action="append",
      help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; repeat it to spread requests over several servers")
    a("--api-key-env", help=f"environment variable holding the API key (default: {d['api_key_env'].default})")
    a("--prompts", type=Path, help="directory of templates replacing the bundled prompts/")
    a("--executor", choices=["local", "ray"], help="where generation runs (default: local; ray: a Ray cluster, see docs/ray.md)")
    a("--ray-actors", type=int, help=f"--executor ray: actor pool size (default: {d['ray_actors'].default})")
    a("--concurrency", type=int, help=f"requests in flight; for vLLM the largest batch (default: {d['concurrency'].default})")
    a("--timeout", type=float, help=f"seconds per request (default: {d['timeout'].default})")
    a("--max-attempts", type=int, help=f"tries per request on transient faults (default: {d['max_attempts'].default})")
    a("--retry-wait", type=float, help=f"first backoff in seconds, doubling with jitter (default: {d['retry_wait'].default})")
    a("--repair-rounds", type=int,
      help=f"requests after an invalid answer, each showing the model its error, 0-5 (default: {d['repair_rounds'].default})")
    a("--temperature", type=float, help=f"(default: {s.temperature})")
    a("--top-p", type=float, help=f"(default: {s.top_p})")
    a("--max-tokens", type=int, help=f"(default: {s.max_tokens})")
    a("--seed", type=_seed, help=f"an integer, or 'none' to send no seed (default: {s.seed})")
    a("--max-caption-chars", type=int, help=f"longer captions are rejected (default: {d['max_caption_chars'].default})")
    a("--max-model-len", type=int, help=f"vLLM context length (default: {d['max_model_len'].default})")
    a("--vllm-arg", dest="vllm_args", action="append", type=_key_value, metavar="KEY=VALUE",
      help="passed to vllm.LLM, e.g. tensor_parallel_size=2 (VALUE read as JSON when it parses); repeatable")
    a("--allow-thinking", dest="disable_thinking", action="store_false",
      help="do not ask thinking models (Qwen3) to skip thinking")
    a("--strict", action="store_true", help="stop at the first bad input line")
    a("--force", action="store_true", help="regenerate answers already in the store")
    a("--no-curate", dest="curate", action="store_false",
      help="stop after generation (curate later with python -m gen.curate)")
    a("--decontaminate-against", action="append", type=Path,
      help="drop captions too close (ROUGE-L > 0.6) to this evaluation set (records with text, as captions: JSON lines, compressed or not, or parquet); repeatable")
    a("--dry-run", action="store_true", help="say what would be generated and its cost; call no LLM, write nothing")
    a("--log-format", choices=["text", "json"], help="json: one object per line, for scheduled jobs")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


def _seed(text: str) -> Optional[int]:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word: a string, as a user would mean it
    return key.strip(), value


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in SAMPLING_FIELDS:
            out.setdefault("sampling", {})[key] = value
        elif key == "vllm_args":
            out[key] = dict(value)
        elif key in CURATION_FLAGS:
            out.setdefault("curation", {})[key] = value
        else:
            out[key] = value
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    names = [*RunConfig.model_fields, *SAMPLING_FIELDS]
    for name in names:
        value = env.get(f"CAPGEN_{name.upper()}")
        if value is None or name in ("sampling", "vllm_args"):  # tables: the file or flags
            continue
        flat[name] = [u.strip() for u in value.split(",") if u.strip()] if name == "base_urls" else value
    return _nest(flat)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    for key in PATH_FIELDS:
        if isinstance(data.get(key), str):
            data[key] = str((path.parent / data[key]).resolve())
    evals = data.get("curation", {}).get("decontaminate_against")
    if isinstance(evals, list):
        data["curation"]["decontaminate_against"] = [str((path.parent / p).resolve()) for p in evals]
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _check_base_urls(data: dict[str, Any], args: dict[str, Any], env: Mapping[str, str],
                     config_file: Optional[Path]) -> None:
    """Refuse an empty or malformed base URL, naming where it came from: the API key goes
    where the URL points, so an unset variable in a job must not mean "the default server"."""
    urls = data.get("base_urls")
    if "base_urls" in args:
        where = "--base-url"
    elif "CAPGEN_BASE_URLS" in env:
        where = "CAPGEN_BASE_URLS"
        if not urls:
            raise ConfigError("CAPGEN_BASE_URLS is set but names no server")
    else:
        where = f"base_urls in {config_file}"
    if data.get("engine") == "openai" and not urls and "OPENAI_BASE_URL" in env:
        where, urls = "OPENAI_BASE_URL", [env["OPENAI_BASE_URL"]]   # the engine's default server
    for url in urls if isinstance(urls, list) else []:
        if isinstance(url, str) and (problem := base_url_problem(url)):
            raise ConfigError(f"{where}: base URL {problem}")


def load_config(argv: Optional[list[str]] = None, env: Mapping[str, str] = os.environ) -> RunConfig:
    args = vars(_parser().parse_args(argv))
    config_file = args.pop("config", None)
    data = _from_file(config_file) if config_file else {}
    data = _merge(data, _from_env(env))
    data = _merge(data, _nest(args))
    if "captions" not in data:
        raise ConfigError("no captions: give --captions FILE (or captions = ... in the config file)")
    data.setdefault("engine", "openai" if data.get("base_urls") else "vllm")
    _check_base_urls(data, args, env, config_file)
    if data.get("log_format") == "json":
        data["progress"] = False  # a bar between JSON lines breaks every log parser
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        where = f" in {config_file}" if config_file else ""
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid settings{where}: {problems}") from None
