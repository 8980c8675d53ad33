"""Pacing and money: a run stays under a hosted API's limits (the user's --rpm/--tpm and the
server's x-ratelimit-* headers) instead of bouncing off them, and says what it costs."""
import asyncio
import json
import logging
import time

import pytest
from conftest import write_jsonl
from fake_openai import FakeOpenAI

from gen.config import Sampling
from gen.engines.cost import bill
from gen.engines import RetryPolicy
from gen.engines import pacing
from gen.engines.openai import OpenAIEngine
from gen.engines.pacing import Pacer, parse_duration
from gen.run import EXIT_OK, main
from schemas import answer_json_schema

CAPTION = "图片中显示了一个安装在墙上的燃气表，旁边有管道和电源适配器。"
MESSAGES = [{"role": "system", "content": "说明"}, {"role": "user", "content": f"描述：{CAPTION}\n输出："}]
COST = 448   # what the fake charges for MESSAGES: 21 prompt tokens and a 427-token answer


def run_engine(fake, n, pacer=None, concurrency=64, attempts=8):
    async def go():
        engine = OpenAIEngine(base_urls=[fake.base_url], model="fake-model", schema=answer_json_schema(),
                              sampling=Sampling(), timeout=10,
                              retry=RetryPolicy(max_attempts=attempts, initial=0.01), pacer=pacer)
        slots = asyncio.Semaphore(concurrency)

        async def one():
            async with slots:
                return await engine.complete(MESSAGES)
        try:
            start = time.monotonic()
            done = await asyncio.gather(*(one() for _ in range(n)))
            return done, time.monotonic() - start, engine.describe()
        finally:
            await engine.aclose()
    return asyncio.run(go())


def statuses(fake):
    return [t["status"] for t in fake.timings]


# --------------------------------------------------------------------------- headers, parsed

@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("6m0s", 360.0), ("120ms", 0.12), ("1h2m3.5s", 3723.5),
                                          ("0.5", 0.5), ("20us", 2e-5)])
def test_reset_durations_in_openai_format(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1s", "1x", "s", "nan", "inf", "1s2", "9" * 50])
def test_reset_that_does_not_parse_is_none(text):
    assert parse_duration(text) is None


# --------------------------------------------------------------------------- the user's limits

@pytest.mark.parametrize("kind", ["sliding", "fixed"])
def test_rpm_keeps_a_burst_under_the_request_limit(kind):
    # 4 requests a second; 12 asked for at once. Without pacing 8 of the first 12 are 429s.
    with FakeOpenAI(rate_limit=(4, 10 ** 6, 1.0), rate_window_kind=kind) as fake:
        done, wall, info = run_engine(fake, 12, Pacer(rpm=240, window=1.0))
        assert len(done) == 12 and 429 not in statuses(fake)
    assert wall >= 2.0          # three windows' worth: it waited rather than asked
    assert info["pacing"]["rpm"] == 240


def test_tpm_with_estimates_corrected_by_usage():
    # 3 requests' actual cost a second; a request's bound (prompt + max_tokens = 1,042) is more
    # than twice its cost, so only the correction by usage lets a third one into a window.
    with FakeOpenAI(rate_limit=(100, 3 * COST, 1.0)) as fake:
        done, wall, info = run_engine(fake, 9, Pacer(tpm=3 * COST * 60, window=1.0))
        assert 429 not in statuses(fake) and len(done) == 9
    assert 1.9 < wall < 4.5     # 3 windows (2 s and replies' time), not 5 at the bound's rate


def test_pacer_charges_usage_once_the_reply_comes():
    async def go():
        p = Pacer(tpm=6000, window=60.0)   # 6,000 tokens a minute
        first = await p.acquire(2000)
        p.settle(first, 2000, {}, 200)      # the first reply: all its bound, and no rate headers
        tickets = [await p.acquire(2000) for _ in range(2)]        # the window is full
        fourth = asyncio.ensure_future(p.acquire(2000))
        await asyncio.sleep(0.05)
        assert not fourth.done()
        for t in tickets:
            p.settle(t, 1000, {}, 200)                             # each cost half its bound
        await asyncio.wait_for(fourth, 1.0)
        # Estimates now follow what replies used: 4,000 of 6,000 bound.
        assert fourth.result().tokens == 1333
    asyncio.run(go())


def test_one_request_larger_than_the_limit_goes_alone(caplog):
    async def go():
        p = Pacer(tpm=60, window=60.0)   # 60 tokens a minute; a request bound at 1,000
        first = await asyncio.wait_for(p.acquire(1000), 1.0)
        p.settle(first, 1000)
        return p
    with caplog.at_level(logging.WARNING):
        asyncio.run(go())   # the first goes at once, and does not wait forever for room it cannot have


# --------------------------------------------------------------------------- the server's headers

def test_headers_hold_requests_until_the_reset():
    # No limits given: the headers alone. 3 requests a second, asked one after another: once
    # the server says none remain, capgen waits for the reset instead of asking into a 429.
    with FakeOpenAI(rate_limit=(3, 10 ** 6, 1.0), rate_headers=True) as fake:
        done, wall, info = run_engine(fake, 9, concurrency=1)
        assert len(done) == 9 and 429 not in statuses(fake)
    assert info["pacing"]["server_reports_limits"] is True and info["pacing"]["holds"] >= 2


def test_with_limits_the_first_request_learns_the_budget_another_job_spent():
    # The key's budget is 4 a second, of which another job spent 3 just now: capgen's own log
    # says 4 are free; the first reply's headers say otherwise, and nothing gets a 429.
    with FakeOpenAI(rate_limit=(4, 10 ** 6, 1.0), rate_headers=True) as fake:
        fake._charges.extend((time.monotonic(), 1) for _ in range(3))
        done, _, _ = run_engine(fake, 6, Pacer(rpm=240, window=1.0))
        assert len(done) == 6 and 429 not in statuses(fake)


def test_a_429_holds_every_request_for_its_retry_after():
    async def go():
        p = Pacer()
        t = await p.acquire(100)
        p.settle(t, 0, {}, 429, retry_after=0.3)
        start = time.monotonic()
        await p.acquire(100)
        return time.monotonic() - start
    assert asyncio.run(go()) >= 0.25


@pytest.mark.parametrize("headers", [
    {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1000h"},
    {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "99999999999999s"},
])
def test_an_absurd_reset_is_capped_and_said_once(headers, monkeypatch, caplog):
    monkeypatch.setattr(pacing, "MAX_HOLD", 0.3)
    with caplog.at_level(logging.WARNING, logger="gen.engines.pacing"):
        with FakeOpenAI(extra_headers=headers) as fake:
            done, wall, _ = run_engine(fake, 4, concurrency=1)
            assert len(done) == 4
    assert wall < 5
    said = [r for r in caplog.records if "waiting" in r.getMessage()]
    assert len(said) == 1 and "0.3 s at most" in said[0].getMessage()


def test_headers_that_do_not_parse_are_ignored_and_said_once(caplog):
    bad = {"x-ratelimit-remaining-requests": "lots", "x-ratelimit-reset-requests": "-5s",
           "x-ratelimit-remaining-tokens": "-3", "x-ratelimit-reset-tokens": "1e999s"}
    with caplog.at_level(logging.WARNING, logger="gen.engines.pacing"):
        with FakeOpenAI(extra_headers=bad) as fake:
            done, wall, info = run_engine(fake, 6)
            assert len(done) == 6
    assert wall < 5 and info["pacing"]["server_reports_limits"] is False
    names = [r.getMessage() for r in caplog.records if "does not parse" in r.getMessage()]
    assert sorted(n.split(": ")[1].split(" ")[0] for n in names) == sorted(
        ["x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "x-ratelimit-remaining-tokens",
         "x-ratelimit-reset-tokens"])


def test_a_usage_far_past_the_bound_does_not_hold_the_run(caplog):
    # A server claiming a billion tokens a reply would otherwise fill --tpm's window for a minute.
    async def go():
        p = Pacer(tpm=100_000, window=60.0)
        t = await p.acquire(1000)
        p.settle(t, 10 ** 9)
        await asyncio.wait_for(p.acquire(1000), 1.0)
    with caplog.at_level(logging.WARNING, logger="gen.engines.pacing"):
        asyncio.run(go())
    assert any("more than 3x" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- settings

def test_limits_and_prices_from_flags_and_the_job_file(tmp_path):
    from gen.cli import ConfigError, load_config
    job = tmp_path / "job.toml"
    job.write_text('captions = "c.jsonl"\nrpm = 500\ntpm = 200000\nrate_window = 10\n'
                   '[pricing]\ninput = 0.5\noutput = 1.5\nbatch_discount = 0.4\n')
    c = load_config(["--config", str(job), "--price-out", "2"], env={})
    assert (c.rpm, c.tpm, c.rate_window) == (500, 200000, 10.0)
    assert (c.pricing.input, c.pricing.output, c.pricing.batch_discount) == (0.5, 2.0, 0.4)
    job.write_text('captions = "c.jsonl"\nrpm = 0\n[pricing]\ninput = -1\nbatch_discount = 2\n')
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(job)], env={})
    assert f"rpm in {job}: expected an integer at least 1, or none, got 0" in str(e.value)
    assert f"pricing.input in {job}: expected a finite number at least 0, or none, got -1" in str(e.value)
    assert f"pricing.batch_discount in {job}: expected a finite number from 0 to 1, got 2" in str(e.value)
    with pytest.raises(ConfigError, match="--price-in: expected a finite number at least 0"):
        load_config(["--captions", "c.jsonl", "--price-in", "-2"], env={})
    with pytest.raises(ConfigError, match="--tpm: expected an integer at least 1"):
        load_config(["--captions", "c.jsonl", "--tpm", "0"], env={})


# --------------------------------------------------------------------------- money

def test_bill_online_and_batch():
    assert bill(2_000_000, 1_000_000, 0.5, 1.5) == pytest.approx(2.5)
    assert bill(2_000_000, 1_000_000, 0.5, 1.5, batch=True) == pytest.approx(1.25)
    assert bill(2_000_000, 1_000_000, 0.5, 1.5, batch=True, batch_discount=0.4) == pytest.approx(1.0)
    assert bill(1, 1, None, 1.5) is None and bill(1, 1, 0.5, None) is None


def test_dry_run_prints_the_bill_or_says_it_is_unknown(tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:10])
    args = ["--captions", str(path), "--out", str(tmp_path / "out"), "--model", "fake-model", "--no-progress",
            "--dry-run", "--max-tokens", "1000"]
    with FakeOpenAI() as fake:
        assert main([*args, "--base-url", fake.base_url]) == EXIT_OK
        unknown = json.loads(capsys.readouterr().out)["cost"]
        assert unknown["online"] is None and unknown["batch"] is None
        assert "cost unknown" in unknown["note"] and "--price-in and --price-out" in unknown["note"]
        assert main([*args, "--base-url", fake.base_url, "--price-in", "1", "--price-out", "10"]) == EXIT_OK
        plan = json.loads(capsys.readouterr().out)
    cost = plan["cost"]
    # Completion at --max-tokens (no history): 10 x 1,000 tokens at 10 per million = 0.1.
    expected = plan["prompt_tokens_estimate"] * 1 / 1e6 + 10 * 1000 * 10 / 1e6
    assert cost["online"] == pytest.approx(expected, abs=1e-6)
    assert cost["batch"] == pytest.approx(expected / 2, abs=1e-6)
    assert plan["completion_estimate_from"] == "max_tokens" and "upper bound" in cost["note"]


def test_manifest_and_report_record_what_the_run_spent(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:5])
    out = tmp_path / "out"
    args = ["--captions", str(path), "--out", str(out), "--model", "fake-model", "--no-progress", "--no-curate"]
    with FakeOpenAI() as fake:
        assert main([*args, "--base-url", fake.base_url, "--price-in", "2", "--price-out", "8"]) == EXIT_OK
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    usage, cost = manifest["usage"], manifest["cost"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert cost["amount"] == pytest.approx((usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 8) / 1e6,
                                           abs=1e-6)
    assert cost["batch"] is False
    html = (out / "report.html").read_text(encoding="utf-8")
    assert f"{cost['amount']:.4f}" in html and "per million input tokens" in html


def test_without_prices_the_manifest_says_the_cost_is_unknown(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:3])
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(["--captions", str(path), "--out", str(out), "--model", "fake-model", "--no-progress",
                     "--no-curate", "--base-url", fake.base_url]) == EXIT_OK
    cost = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["cost"]
    assert cost["amount"] is None and "cost unknown" in cost["note"]
    assert "unknown (no prices set" in (out / "report.html").read_text(encoding="utf-8")



def test_a_server_that_reports_one_limit_only_is_not_paced_by_the_other():
    # Requests reported, tokens never: the unknown token budget must not hold requests back.
    headers = {"x-ratelimit-remaining-requests": "1000", "x-ratelimit-reset-requests": "1s"}
    with FakeOpenAI(extra_headers=headers, latency=0.2) as fake:
        done, wall, info = run_engine(fake, 60, concurrency=20)
    assert len(done) == 60 and info["pacing"]["server_reports_limits"] is True
    assert wall < 2.5   # 3 rounds of 20 at once; one at a time after the first round take 8 s


def test_a_429_holds_every_request_also_where_nothing_was_paced():
    # A server that sends no rate-limit headers, and no limits given: nothing is paced, until
    # a 429 comes; then its Retry-After holds every request, not just its own.
    with FakeOpenAI(faults=lambda i, caption: "429" if i == 1 else None, retry_after="0.6") as fake:
        async def go():
            engine = OpenAIEngine(base_urls=[fake.base_url], model="fake-model", schema=answer_json_schema(),
                                  sampling=Sampling(), timeout=10, retry=RetryPolicy(max_attempts=3, initial=0.01))
            try:
                await engine.complete(MESSAGES)                 # 200, no headers: no pacing needed
                refused = asyncio.ensure_future(engine.complete(MESSAGES))   # a 429, Retry-After 0.6 s
                await asyncio.sleep(0.2)
                start = time.monotonic()
                await engine.complete(MESSAGES)                 # another request, after the 429
                waited = time.monotonic() - start
                await refused
                return waited
            finally:
                await engine.aclose()
        waited = asyncio.run(go())
        assert fake.faults_drawn[1] == "429"
    assert waited >= 0.3
