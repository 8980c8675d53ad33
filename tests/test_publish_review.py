"""Publication under the mistakes and accidents a scheduled job meets: a trainer loading
shards/latest, an --out in the wrong place, a wrong captions file for prune, a server down
for a whole rerun, files that cannot be deleted, damaged or left-over pointer files."""
import json
import os
import time
from pathlib import Path

import pytest
import test_publish_safety as safety
from conftest import write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, main

cli, synthetic, snapshot, leftovers = safety.cli, safety.synthetic, safety.snapshot, safety.leftovers


def latest(out: Path) -> Path:
    return out / "shards" / "latest"


# --- loading shards/latest with `datasets` ---------------------------------------------------

def test_datasets_loads_the_new_rows_of_latest_after_a_rerun(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(60))
    out, cache = tmp_path / "out", str(tmp_path / "hf")
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        first = datasets.load_dataset(str(latest(out)), cache_dir=cache)["train"].num_rows
        write_jsonl(path, synthetic(90))   # the same file names, more rows in them
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
    version = out / "shards" / os.readlink(latest(out))
    expected = json.loads((version / "manifest.json").read_text())["stats"]["splits"]["train"]["query_rows"]
    assert datasets.load_dataset(str(latest(out)), cache_dir=cache)["train"].num_rows == expected != first
    assert datasets.load_dataset(str(version), cache_dir=cache)["train"].num_rows == expected


# --- gen.curate --out into the run's own files ------------------------------------------------

def test_curate_out_into_the_run_directory_or_its_shards_is_refused(tmp_path, capsys):
    from gen.curate.__main__ import main as curate_main
    from gen.run import EXIT_LOCKED, lock_out_dir
    path, out = safety.a_good_run(tmp_path, 20)
    before = snapshot(out)
    capsys.readouterr()
    for dest in (out, tmp_path, latest(out), out / "shards", out / "shards" / "mine", out / "x" / ".." / "shards" / "latest"):
        assert curate_main(["--queries", str(out), "--out", str(dest), "--negatives", "2"]) == EXIT_USAGE, dest
        err = capsys.readouterr().err
        assert "would overwrite the run's own files" in err and "Traceback" not in err
        assert snapshot(out) == before and not leftovers(out)
    assert not (out / "shards" / "mine").exists() and not (tmp_path / "manifest.json").exists()
    elsewhere = tmp_path / "elsewhere"
    lock = lock_out_dir(out)
    try:   # a run writing the run's files meanwhile: --out waits its turn too
        assert curate_main(["--queries", str(out), "--out", str(elsewhere)]) == EXIT_LOCKED
    finally:
        lock.close()
    assert not elsewhere.exists()
    assert curate_main(["--queries", str(out), "--out", str(elsewhere), "--negatives", "2"]) == EXIT_OK
    assert snapshot(out) == before


# --- gen.store prune on a wrong captions file -------------------------------------------------

def test_store_prune_refuses_a_captions_file_with_no_or_far_fewer_captions(tmp_path, capsys):
    from gen.store import prune_main
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(20))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url, "--no-curate")) == EXIT_OK
    stored = safety._stored(out)
    assert stored == 20
    csv = tmp_path / "caps.csv"
    csv.write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in synthetic(20)), encoding="utf-8")
    capsys.readouterr()
    assert prune_main(["--out", str(out), "--captions", str(csv), "--apply"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is a caption (21 rejected)" in err and "nothing was deleted" in err and "Traceback" not in err
    few = write_jsonl(tmp_path / "few.jsonl", synthetic(5))
    for extra in ([], ["--apply"]):
        assert prune_main(["--out", str(out), "--captions", str(few), *extra]) == EXIT_USAGE
        assert "5 captions" in (err := capsys.readouterr().err) and "of the 20" in err and "--allow-shrink" in err
    assert safety._stored(out) == stored
    # as a scheduled job reads it: JSON from the first line to the last, `finished` with the exit
    assert prune_main(["--out", str(out), "--captions", str(few), "--apply", "--allow-shrink",
                       "--log-format", "json"]) == EXIT_OK
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "finished" and lines[-1]["exit_status"] == 0
    assert any(line.get("event") == "pruned" and line["deleted"] == 15 for line in lines)
    assert safety._stored(out) == 5
    # a manifest of another shape: a clear error, not a TypeError
    (out / "manifest.json").write_text("[]")
    assert prune_main(["--out", str(out), "--captions", str(few)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no finished run" in err and "Traceback" not in err


# --- a rerun while the server is down -------------------------------------------------------

def test_a_rerun_against_a_server_that_fails_every_caption_is_exit_3_and_publishes_nothing(tmp_path, capsys):
    path, out = safety.a_good_run(tmp_path, 20)
    before = snapshot(out)
    capsys.readouterr()
    with FakeOpenAI(faults={"503": 1.0}) as down:   # new settings: every caption asked again
        assert main(cli(path, out, down.base_url, "--temperature", "0.5", "--max-attempts", "2")) == EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert "20 captions got no answer" in err and "--allow-shrink" not in err and "Traceback" not in err
    assert "previous outputs" in err.strip().splitlines()[-1]
    assert snapshot(out) == before and not leftovers(out)
    with FakeOpenAI() as fake:   # the server back: the rerun publishes
        assert main(cli(path, out, fake.base_url, "--temperature", "0.5")) == EXIT_OK
        assert len(fake.requests) == 20
    assert os.readlink(latest(out)) != before["latest ->"].decode()


# --- a captions file with no caption in it, with --allow-shrink -------------------------------

def test_a_file_with_no_caption_is_refused_before_anything_is_published_even_with_allow_shrink(tmp_path, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(20))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        before = snapshot(out)
        capsys.readouterr()
        path.write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in synthetic(20)), encoding="utf-8")
        assert main(cli(path, out, fake.base_url, "--allow-shrink")) == EXIT_USAGE
    assert snapshot(out) == before and not leftovers(out)
    err = capsys.readouterr().err
    assert "no line of" in err and "21 rejected" in err and "line 1:" in err and "Traceback" not in err


# --- an old version that cannot be deleted -------------------------------------------------

def test_an_old_version_that_cannot_be_deleted_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    real_unlink = os.unlink
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        first = os.readlink(latest(out))

        def guarded(name, *args, dir_fd=None, **kwargs):   # what chattr +i or another owner does
            if dir_fd is not None and name == "README.md" and first in os.readlink(f"/proc/self/fd/{dir_fd}"):
                raise PermissionError(1, "Operation not permitted", name)
            return real_unlink(name, *args, dir_fd=dir_fd, **kwargs)

        monkeypatch.setattr(os, "unlink", guarded)
        capsys.readouterr()
        for n in (12, 14):
            time.sleep(1.1)   # versions are named by the second
            write_jsonl(path, synthetic(n))
            assert main(cli(path, out, fake.base_url, "--keep-versions", "1")) == EXIT_OK
            err = capsys.readouterr().err
            assert f"old shard version {out / 'shards' / first} could not be deleted" in err and "README.md" in err
            assert json.loads((out / "manifest.json").read_text())["counts"]["captions"] == n
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted([first, os.readlink(latest(out)), "latest"])


# --- odd or damaged shards/latest -----------------------------------------------------------

def test_the_dry_run_refuses_a_copied_latest_as_the_run_does(tmp_path, capsys):
    import shutil
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        target = latest(out).resolve()
        latest(out).unlink()
        shutil.copytree(target, latest(out))          # what `cp -rL` leaves
        capsys.readouterr()
        assert main(cli(path, out, fake.base_url)) == EXIT_USAGE
        refused = [line for line in capsys.readouterr().err.splitlines() if "not the symlink" in line]
        assert main(cli(path, out, fake.base_url, "--dry-run")) == EXIT_USAGE
        err = capsys.readouterr().err
    assert refused and refused[0].split("ERROR ", 1)[-1] in err and "Errno" not in err


@pytest.mark.parametrize("damage", ['{"digest": null', '{"digest": null}', "[]", ""])
def test_a_damaged_latest_inputs_file_is_a_warning_and_a_new_version(tmp_path, capsys, damage):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        first = os.readlink(latest(out))
        (latest(out) / "inputs.json").write_text(damage)
        capsys.readouterr()
        assert main(cli(path, out, fake.base_url, "--dry-run")) == EXIT_OK
        assert "is damaged" in (err := capsys.readouterr().err) and "Traceback" not in err
        time.sleep(1.1)   # versions are named by the second
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        assert "is damaged" in (err := capsys.readouterr().err) and "Traceback" not in err
    assert os.readlink(latest(out)) != first
    assert json.loads((latest(out) / "inputs.json").read_text())["digest"]


# --- what a kill -9 leaves -------------------------------------------------------------------

def test_a_killed_runs_stream_copy_and_half_swapped_pointer_are_cleared_by_the_next(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        (out / ".captions-k9x2ab.stream").write_text('{"id": "s0", "text": "一只')   # killed while copying stdin
        os.symlink(os.readlink(latest(out)), out / "shards" / ".latest.99999")        # killed before os.replace
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
    assert not leftovers(out)


# --- warnings name what a person can open ------------------------------------------------------

def test_the_grounding_warning_names_the_run_directory_not_its_staging(tmp_path, capsys):
    from fake_openai import default_answer
    rows = synthetic(40)
    previous = {r["text"]: rows[i - 1]["text"] for i, r in enumerate(rows)}
    path = write_jsonl(tmp_path / "caps.jsonl", rows)
    out = tmp_path / "out"
    with FakeOpenAI(answer=lambda caption, body: default_answer(previous[caption])) as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
    warning = [line for line in capsys.readouterr().err.splitlines() if "answering about other captions" in line]
    assert warning and f"curation of {out}:" in warning[0] and ".staging" not in warning[0]


# --- the dry run writes nothing ------------------------------------------------------------------

def test_the_dry_run_writes_nothing_beside_the_store(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(cli(path, out, fake.base_url)) == EXIT_OK
        before = sorted(p.name for p in out.iterdir())
        stat = (out / "cache.sqlite").stat()
        write_jsonl(path, synthetic(14))
        assert main(cli(path, out, fake.base_url, "--dry-run")) == EXIT_OK
        assert sorted(p.name for p in out.iterdir()) == before
        assert (out / "cache.sqlite").stat().st_mtime_ns == stat.st_mtime_ns
        nowhere = tmp_path / "nowhere"
        assert main(cli(path, nowhere, fake.base_url, "--dry-run")) == EXIT_OK
        assert not (nowhere / "cache.sqlite").exists()


def test_inputs_back_to_an_older_versions_within_its_second_make_a_version_of_their_own(tmp_path, monkeypatch):
    import gen.publish
    monkeypatch.setattr(gen.publish.time, "strftime", lambda fmt, t=None: "20260101T000000Z")
    path = write_jsonl(tmp_path / "caps.jsonl", synthetic(10))
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        for n in (10, 12, 10):
            write_jsonl(path, synthetic(n))
            assert main(cli(path, out, fake.base_url)) == EXIT_OK
    assert json.loads((latest(out) / "manifest.json").read_text())["stats"]["captions_in"] == 10
    assert len([p for p in (out / "shards").iterdir() if not p.is_symlink()]) == 3
