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
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ValidationError

from gen.config import Pricing, RunConfig, Sampling, base_url_problem
from gen.settings import describe, problems

PATH_FIELDS = ("captions", "out", "cache", "prompts", "batch_dir")
SAMPLING_FIELDS = tuple(Sampling.model_fields)
# Curation settings reachable by flag; the rest go in the file's [curation] table.
CURATION_FLAGS = ("decontaminate_against", "dataset_license")
# Flags that set the [pricing] table's keys.
PRICING_FLAGS = {"price_in": "input", "price_out": "output"}


class ConfigError(ValueError):
    def __init__(self, message: str, usage: Optional[str] = None):
        super().__init__(message)
        self.usage = usage


class Parser(argparse.ArgumentParser):
    """Raises ConfigError where argparse would print and exit: the caller logs it in the
    job's log format, and a JSON log stays JSON from its first line."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}", usage=self.format_usage())


def _parser() -> argparse.ArgumentParser:
    d = RunConfig.model_fields

    def r(name: str, model=RunConfig) -> str:  # the range the model enforces, and the default
        field = model.model_fields[name]
        return f"{describe(field)}; default: {field.default}"
    S = argparse.SUPPRESS  # an absent flag must not override the file or the environment
    ap = Parser(prog="python -m gen.run", argument_default=S,
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
    a("--ray-actors", type=int, help=f"--executor ray: actors, each one engine (a vLLM replica) ({r('ray_actors')})")
    a("--ray-gpus-per-actor",
      help=f"--executor ray: GPUs Ray gives each actor ({r('ray_gpus_per_actor')}: tensor_parallel_size x "
           "pipeline_parallel_size for --engine vllm on a cluster with GPUs, else 0)")
    a("--concurrency", type=int, help=f"requests in flight; for vLLM the largest batch ({r('concurrency')})")
    a("--timeout", type=float, help=f"seconds per request ({r('timeout')})")
    a("--max-attempts", type=int, help=f"tries per request on transient faults ({r('max_attempts')})")
    a("--retry-wait", type=float, help=f"first backoff in seconds, doubling with jitter ({r('retry_wait')})")
    a("--rpm", type=int, help=f"the API key's requests per minute: capgen stays under it ({r('rpm')})")
    a("--tpm", type=int, help="the API key's tokens per minute (prompt + answer; a request is counted at its "
      f"prompt plus --max-tokens until its usage is known) ({r('tpm')})")
    a("--rate-window", type=float, help="seconds the provider counts --rpm and --tpm over, the limits scaled "
      f"to it (1 for one that counts per second) ({r('rate_window')})")
    a("--price-in", type=float, help="price per million input (prompt) tokens, for the dry run's bill and "
      f"the manifest's; no default: unset means the cost is unknown ({describe(Pricing.model_fields['input'])})")
    a("--price-out", type=float, help="price per million output (completion) tokens "
      f"({describe(Pricing.model_fields['output'])})")
    a("--repair-rounds", type=int,
      help=f"requests after an invalid answer, each showing the model its error ({r('repair_rounds')})")
    a("--temperature", type=float, help=f"({r('temperature', Sampling)})")
    a("--top-p", type=float, help=f"({r('top_p', Sampling)})")
    a("--max-tokens", type=int, help=f"({r('max_tokens', Sampling)})")
    a("--seed", type=_seed, help=f"'none' sends no seed ({r('seed', Sampling)})")
    a("--max-caption-chars", type=int, help=f"longer captions are rejected ({r('max_caption_chars')})")
    a("--max-model-len", type=int, help=f"vLLM context length, more than --max-tokens ({r('max_model_len')})")
    a("--vllm-arg", dest="vllm_args", action="append", type=_key_value, metavar="KEY=VALUE",
      help="a vLLM engine argument, e.g. tensor_parallel_size=2 (VALUE read as JSON when it parses); repeatable")
    a("--allow-thinking", dest="disable_thinking", action="store_false",
      help="do not ask thinking models (Qwen3) to skip thinking")
    a("--strict", action="store_true", help="stop at the first bad input line")
    a("--force", action="store_true", help="regenerate answers already in the store")
    a("--no-curate", dest="curate", action="store_false",
      help="stop after generation (curate later with python -m gen.curate)")
    a("--keep-versions", type=int, help=f"curated versions kept under <out>/shards/ ({r('keep_versions')})")
    a("--min-share-of-previous", type=float,
      help="refuse to publish when the captions (or curated pairs) fall below this share of the previous "
           f"run's, keeping the previous outputs ({r('min_share_of_previous')})")
    a("--allow-shrink", dest="min_share_of_previous", action="store_const", const=0.0,
      help="publish however much the captions or pairs shrank (--min-share-of-previous 0)")
    a("--decontaminate-against", action="append", type=Path,
      help="drop captions too close (ROUGE-L > 0.6) to this evaluation set (records with text, as captions: JSON lines, compressed or not, or parquet); repeatable")
    a("--dataset-license", help="the licence each shard version's dataset card states, e.g. cc-by-4.0 (default: unknown)")
    a("--dry-run", action="store_true", help="say what would be generated and its cost, whether curation would "
      "publish, and whether each server lists the model (GET /v1/models; exit 1 if none would serve); "
      "generate nothing, write nothing")
    a("--batch", action="store_true", help="submit to the server's batch API (about half the price; see "
      "README, Batch mode): collects finished batches, submits what is new, exits 4 while answers are pending")
    a("--wait", action="store_true", help="--batch: poll until every batch has finished, then export")
    a("--batch-cancel", action="store_true", help="cancel the pending batches of this answer store and exit")
    a("--batch-dir", type=Path, help="batch mode through a directory: request files are written there, result "
      "files placed beside them are collected (a shared file system and a queue; see README)")
    a("--batch-window", help=f"the batch's completion window ({d['batch_window'].default})")
    a("--batch-max-requests", type=int, help=f"requests per batch file ({r('batch_max_requests')})")
    a("--batch-max-bytes", type=int, help=f"bytes per batch file ({r('batch_max_bytes')})")
    a("--batch-poll", type=float, help=f"--wait: first pause between polls in seconds, doubling to 600 ({r('batch_poll')})")
    a("--batch-repair", choices=["batch", "online"], help="where repair rounds of invalid batch answers go: "
      "the next batch (default: the batch price, no online server needed) or online at once")
    a("--log-format", choices=["text", "json"], help="json: one object per line, for scheduled jobs")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("-v", "--verbose", action="store_true",
      help="show the engine's own output (vLLM, torch, Ray) instead of writing it to <out>/engine.log")
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
        elif key in PRICING_FLAGS:
            out.setdefault("pricing", {})[PRICING_FLAGS[key]] = value
        else:
            out[key] = value
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    names = [*RunConfig.model_fields, *SAMPLING_FIELDS]
    for name in names:
        value = env.get(f"CAPGEN_{name.upper()}")
        if value is None or name in ("sampling", "vllm_args", "pricing"):  # tables: the file or flags
            continue
        flat[name] = [u.strip() for u in value.split(",") if u.strip()] if name == "base_urls" else value
    return _nest(flat)


_streams: dict[tuple, bytes] = {}


def _job_bytes(path: Path) -> bytes:
    """The job file's bytes. A pipe (--config <(...)) can be read only once, and the log
    format is looked up before the settings are read: its bytes are kept for the second."""
    from gen.input.captions import is_stream
    if not is_stream(path):
        return path.read_bytes()
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino)   # a new pipe at the same /dev/fd path is new
    if key not in _streams:
        _streams[key] = path.read_bytes()
    return _streams[key]


def _table(field) -> Optional[type]:
    """The model of a field that is a TOML table (dict for a free one), else None."""
    from gen.settings import base_type
    kind = base_type(field.annotation)[0]
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return kind
    return dict if kind is dict or getattr(kind, "__origin__", None) is dict else None


def _kind(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "an array of tables"
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), "a date or time")   # all TOML has besides


def _check_shapes(data: dict, model: type[BaseModel], where: str, prefix: str = "") -> None:
    """A table where the model has one, a value where it has a value: else a ConfigError
    naming the key. Unknown keys and wrong values are the model's to name."""
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        name, table = f"{prefix}{key}", _table(field)
        if table is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} in {where}: expected a table ([{name}]), got {_kind(value)}")
        if table is None and isinstance(value, dict):
            raise ConfigError(f"{name} in {where}: expected {describe(field)}, got a table")
        if table not in (None, dict):
            _check_shapes(value, table, where, f"{name}.")


def _path(base: Path, value: Any, name: str, where: Path) -> Any:
    """A path in the file, made absolute against the file's folder; a wrong type is left for
    the model to name."""
    if not isinstance(value, str):
        return value
    if "\0" in value:   # no file has one; os calls refuse it with a ValueError
        raise ConfigError(f"{name} in {where}: the path holds a NUL character")
    return str((base / value).resolve())


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(_job_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_shapes(data, RunConfig, str(path))
    for key in PATH_FIELDS:
        if key in data:
            data[key] = _path(path.parent, data[key], key, path)
    evals = data.get("curation", {}).get("decontaminate_against")
    if isinstance(evals, list):
        name = "curation.decontaminate_against"
        data["curation"]["decontaminate_against"] = [_path(path.parent, p, name, path) for p in evals]
    return data


_TOP_LOG_FORMAT = re.compile(r"""^\s*log_format\s*=\s*["'](\w+)["']""")


def _file_log_format(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    try:
        text = _job_bytes(path).decode("utf-8", errors="replace")
    except (OSError, ValueError):   # ValueError: a NUL in the path
        return None
    try:
        return tomllib.loads(text).get("log_format")
    except tomllib.TOMLDecodeError:
        # A file broken elsewhere may still say how its job is logged; top-level keys only.
        for line in text.splitlines():
            if line.lstrip().startswith("["):
                break
            if m := _TOP_LOG_FORMAT.match(line):
                return m.group(1)
    return None


def log_format_hint(argv: list[str], env: Mapping[str, str] = os.environ) -> str:
    """The log format asked for, found before the settings are checked, so that an error in
    them is logged as the job's scheduler reads its log. Precedence as in load_config."""
    pre = Parser(add_help=False, argument_default=argparse.SUPPRESS)
    pre.add_argument("--config", type=Path)
    pre.add_argument("--log-format")
    try:
        args, _ = pre.parse_known_args(argv)
    except ConfigError:
        args = argparse.Namespace()
    for found in (getattr(args, "log_format", None), env.get("CAPGEN_LOG_FORMAT"),
                  _file_log_format(getattr(args, "config", None))):
        if found in ("text", "json"):
            return found
    return "text"


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        below = out.get(k)
        out[k] = _merge(below if isinstance(below, dict) else {}, v) if isinstance(v, dict) else v
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
        name = _namer(flags=_nest(args), env=_from_env(env), file=config_file)
        raise ConfigError("invalid settings: " + "; ".join(problems(e, RunConfig, name))) from None


def _namer(flags: dict, env: dict, file: Optional[Path]):
    """A setting's name as the user wrote it, where the winning value came from: the flag,
    the environment variable or the job file's key."""
    options = {a.dest: a.option_strings[0] for a in _parser()._actions if a.option_strings}
    options.update({key: options.pop(flag) for flag, key in PRICING_FLAGS.items()})

    def has(layer: dict, names: tuple[str, ...]) -> bool:
        for n in names:
            if not isinstance(layer, dict) or n not in layer:
                return False
            layer = layer[n]
        return True

    def name(names: tuple[str, ...]) -> str:
        if has(flags, names) and names[-1] in options:
            return options[names[-1]]
        if has(env, names):
            return f"CAPGEN_{names[-1].upper()}"
        key = ".".join(names)
        return f"{key} in {file}" if file else key
    return name
