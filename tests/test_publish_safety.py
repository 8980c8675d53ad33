"""What capgen publishes (outputs, shard versions, the answer store) stays whole and readable
under odd states, shrunken inputs and stop signals: every stop or refusal leaves the previous
complete state or the new one, never a mix, and says which."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, write_jsonl
from fake_openai import FakeOpenAI

from gen.atomic import atomic_path
from gen.run import EXIT_LOCKED, EXIT_OK, EXIT_USAGE, lock_out_dir, main

COLORS = "红 橙 黄 绿 青 蓝 紫 黑 白 灰".split()
THINGS = "猫 狗 马 鸟 鱼 车 船 伞 灯 树".split()
PLACES = "草地上 桌子上 河边 路口 屋顶上 窗台上 沙滩上 雪地里".split()


def synthetic(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        c, t, p = COLORS[i % 10], THINGS[(i // 10) % 10], PLACES[(i // 100) % 8]
        rows.append({"id": f"s{i}", "text": f"一只{c}色的{t}在{p}，旁边站着第{i}位穿外套的行人"})
    return rows


def cli(captions: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["--captions", str(captions), "--out", str(out), "--base-url", url, "--model", "fake-model",
            "--no-progress", "--retry-wait", "0.01", *extra]


def a_good_run(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """n synthetic captions through a fake server into tmp_path/out: the previous, complete
    state a test then disturbs. Returns (captions file, output directory)."""
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(n))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
    return path, out


def snapshot(out: Path) -> dict[str, bytes]:
    """Every published file's bytes, and where shards/latest points."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and ".lock" != p.name and not p.name.startswith("cache.sqlite")}
    files["latest ->"] = os.readlink(out / "shards" / "latest").encode()
    return files


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.rglob(".*") if p.name != ".lock"]


# --- the published files -------------------------------------------------------------------

def test_outputs_and_shards_are_readable_as_the_umask_allows(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:10])
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        with FakeOpenAI() as fake:
            assert main(cli(path, out, fake.base_url)) == EXIT_OK
        files = [p for p in out.rglob("*") if p.is_file() and p.name != "cache.sqlite"]
        assert any(p.name == "train-00000.parquet" for p in files)
        private = [p.relative_to(out).as_posix() for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644]
        assert not private
        os.umask(0o077)
        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("x")
        assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_real_folder_at_shards_latest_is_refused_before_anything_changes(tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:10])
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        latest = out / "shards" / "latest"
        target = latest.resolve()
        latest.unlink()
        shutil.copytree(target, latest)          # what `cp -rL` leaves
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
        requests = len(fake.requests)
        write_jsonl(path, sample_captions[:14])
        for _ in range(2):                       # and every later run alike
            assert main(cli(path, out, fake.base_url)) == EXIT_USAGE
        assert len(fake.requests) == requests    # refused before paying for anything
    assert "not the symlink" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_curation_that_keeps_no_pair_does_not_replace_a_good_version(tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:10])
    out = tmp_path / "out"
    english = [{"id": f"en{i}", "text": f"a {c} dog runs across the wide green field number {i}"}
               for i, c in enumerate("red blue black white brown grey tan gold pink teal".split())]
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        before = snapshot(out)
        capsys.readouterr()
        write_jsonl(path, english)
        assert main(cli(path, out, fake.base_url)) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "curation kept 0 pairs" in err and "cjk" in err and "--allow-shrink" in err
        assert snapshot(out) == before and not leftovers(out)
        # expected: published, and said so with the reason
        assert main(cli(path, out, fake.base_url, "--allow-shrink")) == EXIT_OK
        err = capsys.readouterr().err
        assert "curation kept no pair" in err and "cjk" in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["curation"]["stats"]["pairs_out"] == 0
    assert m["curation"]["dir"] == "shards/" + os.readlink(out / "shards" / "latest")


# --- gen.curate on a wrong path or a damaged file ------------------------------------------

def test_curate_on_a_wrong_path_or_damaged_file_names_it_and_creates_nothing(tmp_path, sample_captions, capsys):
    from gen.curate.__main__ import main as curate_main
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:6])
    run = tmp_path / "run"
    with FakeOpenAI() as fake:
        assert main(cli(path, run, fake.base_url, "--no-curate")) == EXIT_OK
    typo = tmp_path / "rnu"
    assert curate_main(["--queries", str(typo)]) == 2
    assert "rnu" in capsys.readouterr().err and not typo.exists()
    assert curate_main(["--queries", str(path)]) == 2              # a regular file
    assert "caps.jsonl is a file" in capsys.readouterr().err
    assert curate_main(["--queries", str(run / "nested")]) == 2
    assert not (run / "nested").exists()
    for bad in (["--keep-versions", "0"], ["--min-share-of-previous", "2"]):
        assert curate_main(["--queries", str(run), *bad]) == 2
    assert "invalid settings" in capsys.readouterr().err
    data = (run / "queries.parquet").read_bytes()
    (run / "queries.parquet").write_bytes(data[: len(data) // 2])   # truncated
    for extra in ([], ["--out", str(tmp_path / "elsewhere")]):
        assert curate_main(["--queries", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert "queries.parquet is not a readable parquet file" in err and "Traceback" not in err
    assert not (run / "shards").exists() and not (tmp_path / "elsewhere").exists()


# --- signals ---------------------------------------------------------------------------------

def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, "the moment to signal never came"
        time.sleep(0.005)


def _curating(out: Path, before: dict) -> bool:
    """A folder for the new version has appeared: curation is under way."""
    known = {"latest", before["latest ->"].decode()}
    return any(p.name not in known for p in (out / "shards").iterdir())


def _stored(out: Path) -> int:
    import sqlite3
    try:
        db = sqlite3.connect(str(out / "cache.sqlite"))
        try:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGHUP,)],
                         ids=["two-sigints-50ms-apart", "sighup"])
def test_stops_during_generation_exit_143_and_leave_the_previous_outputs(tmp_path, signals):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(20))
    out = tmp_path / "out"
    with FakeOpenAI(latency=0.2) as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        before = snapshot(out)
        write_jsonl(path, synthetic(120))
        proc = _start(["-m", "gen.run", *cli(path, out, fake.base_url, "--concurrency", "4")])
        _wait_for(lambda: _stored(out) >= 28, proc)
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.05)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    assert "previous outputs" in err.strip().splitlines()[-1]
    assert snapshot(out) == before and not leftovers(out)


def test_sigterm_while_gen_run_curates_leaves_the_previous_outputs_and_says_so(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(300))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        before = snapshot(out)
        write_jsonl(path, synthetic(320))
        proc = _start(["-m", "gen.run", *cli(path, out, fake.base_url)])
        _wait_for(lambda: _curating(out, before), proc)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "previous outputs" in err.strip().splitlines()[-1]
    assert snapshot(out) == before and not leftovers(out)


def test_sigint_during_gen_curate_leaves_latest_and_no_partial_version(tmp_path):
    path, out = a_good_run(tmp_path, 300)
    before = snapshot(out)
    proc = _start(["-m", "gen.curate", "--queries", str(out), "--negatives", "3"])
    _wait_for(lambda: _curating(out, before), proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "previous outputs were left as they were" in err.strip().splitlines()[-1]
    assert snapshot(out) == before and not leftovers(out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(["latest", os.readlink(out / "shards" / "latest")])


def test_a_stop_after_publishing_says_the_new_outputs_are_complete(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    real_replace = os.replace

    def replace_then_stop(src, dst):   # SIGTERM as the manifest lands, the last file
        real_replace(src, dst)
        if Path(dst) == out / "manifest.json":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace_then_stop)
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url, "--log-format", "json")) == 143
    last = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert "the new outputs are complete" in last["message"] and last["outputs"] == "new"
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["captions"] == 10 and m["curation"]["dir"] == "shards/" + os.readlink(out / "shards" / "latest")


def test_what_a_killed_run_left_half_made_is_cleared_by_the_next(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "queries.parquet").write_text("half")
    (out / "shards" / ".20260101T000000Z-deadbeef.partial").mkdir(parents=True)
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
    assert not leftovers(out)
    assert json.loads((out / "manifest.json").read_text())["counts"]["captions"] == 10


def test_sigint_during_gen_curate_out_leaves_the_previous_curation_there(tmp_path):
    from gen.curate.__main__ import main as curate_main
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(300))
    run, dest = tmp_path / "run", tmp_path / "dest"
    with FakeOpenAI() as fake:
        assert main(cli(path, run, fake.base_url, "--no-curate")) == EXIT_OK
    assert curate_main(["--queries", str(run), "--out", str(dest), "--negatives", "3"]) == 0
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    proc = _start(["-m", "gen.curate", "--queries", str(run), "--out", str(dest), "--negatives", "2"])
    _wait_for(lambda: (dest / ".partial").exists() or not (dest / "manifest.json").exists(), proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "previous outputs were left as they were" in err.strip().splitlines()[-1]
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    # and uninterrupted, the new curation replaces the old whole
    assert curate_main(["--queries", str(run), "--out", str(dest), "--negatives", "2"]) == 0
    assert json.loads((dest / "manifest.json").read_text())["settings"]["negatives"] == 2
    assert not leftovers(dest)


# --- a captions file that shrank -------------------------------------------------------------

def test_a_captions_file_that_shrank_is_refused_unless_the_job_expects_it(tmp_path, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(20))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        before = snapshot(out)
        capsys.readouterr()
        for rows in ([], synthetic(9)):           # empty; 45% of the previous run
            write_jsonl(path, rows)
            assert main(cli(path, out, fake.base_url, "--dry-run")) == EXIT_USAGE   # the pre-flight says so
            assert "would be refused" in capsys.readouterr().err
            assert main(cli(path, out, fake.base_url)) == EXIT_USAGE
            err = capsys.readouterr().err
            assert f"{len(rows)} captions, under 50% of the 20" in err and "--allow-shrink" in err
            assert snapshot(out) == before and not leftovers(out)
        job = tmp_path / "job.toml"
        job.write_text("min_share_of_previous = 0.4\n")
        assert main(["--config", str(job), *cli(path, out, fake.base_url)]) == EXIT_OK
        assert json.loads((out / "manifest.json").read_text())["counts"]["captions"] == 9
        # the empty file, when the job says so: every file beside the others agrees
        write_jsonl(path, [])
        assert main(cli(path, out, fake.base_url, "--allow-shrink")) == EXIT_OK
        for bad in ("1.5", "-0.1"):
            assert main(cli(path, out, fake.base_url, "--min-share-of-previous", bad)) == EXIT_USAGE
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["captions"] == 0 and pq.read_metadata(out / "captions.parquet").num_rows == 0
    assert m["curation"]["dir"] == "shards/" + os.readlink(out / "shards" / "latest")
    assert m["curation"]["stats"]["queries_in"] == 0


# --- retention and the store -----------------------------------------------------------------

def test_versions_kept_is_a_setting(tmp_path, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        for n in (10, 12, 14):
            write_jsonl(path, synthetic(n))
            assert main(cli(path, out, fake.base_url, "--keep-versions", "2")) == EXIT_OK
            time.sleep(1.1)   # versions are named by the second
        versions = [p for p in (out / "shards").iterdir() if not p.is_symlink()]
        assert len(versions) == 2 and (out / "shards" / "latest").resolve() in [v.resolve() for v in versions]
        assert main(cli(path, out, fake.base_url, "--keep-versions", "0")) == EXIT_USAGE
    assert "--keep-versions" in capsys.readouterr().err


def test_store_prune_counts_then_deletes_only_unused_answers_and_respects_the_lock(tmp_path, capsys):
    from gen.store import prune_main
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(20))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url, "--no-curate")) == EXIT_OK
        write_jsonl(path, synthetic(12, start=15))        # 5 kept, 7 new, 15 gone
        assert main(cli(path, out, fake.base_url, "--no-curate")) == EXIT_OK
        assert _stored(out) == 27
        args = ["--out", str(out), "--captions", str(path)]
        assert prune_main(args) == 0                       # counts only
        assert "27 answers, 12 used" in capsys.readouterr().err and _stored(out) == 27
        lock = lock_out_dir(out)
        try:
            assert prune_main([*args, "--apply"]) == EXIT_LOCKED   # a run holds the directory
        finally:
            lock.close()
        assert str(out) in capsys.readouterr().err and _stored(out) == 27
        assert prune_main([*args, "--apply"]) == 0
        assert _stored(out) == 12
        requests = len(fake.requests)
        assert main(cli(path, out, fake.base_url, "--no-curate")) == EXIT_OK
        assert len(fake.requests) == requests              # nothing the captions use was lost
