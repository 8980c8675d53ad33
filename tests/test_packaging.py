"""A wheel carries the prompts and schemas: an installed capgen must not need a checkout."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_templates_and_schemas(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("capgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (ROOT / "prompts").glob("*.j2"):
        assert f"prompts/{template.name}" in names
    assert {"schemas/answer.py", "gen/run.py", "gen/engines/openai.py"} <= names
    # and they load from the unpacked wheel, away from the source tree
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from gen.generate.prompts import PromptSet; from schemas import Caption; p = PromptSet(); "
            "assert str(p.directory).startswith(%r); print(p.messages(Caption(id='a', text='猫'))[1]['content'])"
            % str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "猫" in out.stdout


def test_importing_the_cli_keeps_numba_out():
    # numba's llvmlite in a process that starts vLLM's CPU workers breaks them (they
    # re-import gen.run); curation's heavy imports must wait until curation runs.
    code = ("import sys, gen.run; bad = [m for m in ('numba', 'llvmlite', 'bm25s') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
