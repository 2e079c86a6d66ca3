"""Metering and budgets: the fixes of issue 5's audit, each shown through real servers and files."""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import aiohttp
import openai
import pytest
import yaml

from proxy import Context, Plugin, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, register_plugin
from tests.plugins.test_metering import ledger_rows  # the same reader as the metering tests

PRICES = {"sluice-demo": {"input": 2.0, "cached_input": 1.0, "output": 8.0}}


def config(upstream: FakeUpstream, chain: list | None = None, **metering) -> dict:
    return {
        "upstreams": {"demo": {"url": upstream.url, "models": ["sluice-demo"]}},
        "prices": PRICES,
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "demo",
                    "chain": [*(chain or []), {"metering": metering}]}],
    }


class WatchedPool(ThreadPoolExecutor):
    """The standard thread pool, listing the functions submitted to it: which work ran in the executor."""

    def __init__(self) -> None:
        super().__init__(max_workers=2, thread_name_prefix="watched")
        self.ran: list[str] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        self.ran.append(getattr(fn, "args", (fn,))[0].__name__)  # run_cpu submits partial(context.run, fn, ...)
        return super().submit(fn, *args, **kwargs)

    @classmethod
    def install(cls, *runtimes) -> WatchedPool:
        """A new pool as the executor of ``runtimes`` (a runtime and its views share one), the old one shut down."""
        pool = cls()
        runtimes[0]._executor.shutdown()
        for rt in runtimes:
            rt._executor = pool
        return pool


BAD_TIMES = ["9" * 400 + "d", "9" * 5000 + "m", "²d", "not-a-time", "0001-01-01T00:00:00+01:00x"]


async def test_admin_usage_answers_400_for_any_bad_time(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
            for bad in BAD_TIMES:
                for name in ("since", "until"):
                    async with http.get(f"{s.admin_url}/admin/usage", params={name: bad}) as r:
                        assert r.status == 400, (name, bad[:20], await r.text())
                        assert r.headers["x-request-id"]
                        err = (await r.json())["error"]
                        assert err["type"] == "invalid_request_error" and "cannot read time" in err["message"]
                        assert len(err["message"]) < 200  # the value is not echoed whole
            async with http.get(f"{s.admin_url}/admin/usage", params={"since": "7d", "until": "2999-01-01"}) as r:
                assert r.status == 200


def test_sluice_usage_reports_a_bad_time_without_a_traceback(tmp_path: Path, capsys):
    from proxy.cli import main

    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump({"upstreams": {"demo": {"url": "http://127.0.0.1:9/v1"}},
                                    "routes": [{"match": {"path": "/v1/"}, "upstream": "demo", "chain": [{"metering": {}}]}],
                                    "state": {"dir": str(tmp_path)}}))
    for bad in BAD_TIMES:
        for flag in ("--since", "--until"):
            assert main(["usage", "-c", str(path), flag, bad]) == 2
            err = capsys.readouterr().err
            assert err.startswith("sluice usage: cannot read time") and "Traceback" not in err, err[:300]



async def test_client_gone_before_the_answer_is_estimated_and_unreached_stays_zero(upstream: FakeUpstream, tmp_path: Path):
    """The request reached the upstream (it bills the prompt) but the client left before the
    headers: the prompt is counted and the row marked estimated. An attempt that never
    connected generated nothing: zero tokens, not estimated."""
    import asyncio
    import socket

    upstream.first_byte_delay = 30.0
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    cfg = config(upstream)
    cfg["upstreams"]["dead"] = {"url": f"http://127.0.0.1:{dead}/v1", "models": ["sluice-demo"]}
    cfg["routes"].insert(0, {"name": "dead", "match": {"path": "/dead/"}, "upstream": "dead", "chain": [{"metering": {}}]})
    prompt = "count this prompt please " * 10
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c:
            ask = asyncio.ensure_future(c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": prompt}]))
            await upstream.wait_for(lambda: len(upstream.requests) == 1)
            ask.cancel()  # the client goes away while the upstream still thinks
            with pytest.raises(asyncio.CancelledError):
                await ask
        async with openai.AsyncOpenAI(base_url=s.origin + "/dead", api_key="sk-test", max_retries=0) as c:
            with pytest.raises(openai.APIStatusError) as exc:
                await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": prompt}])
            assert exc.value.status_code == 502
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    gone, unreached = ledger_rows(tmp_path)
    assert gone["route"] == "main" and gone["outcome"] == "client_gone"
    assert gone["estimated"] == 1 and gone["completion_tokens"] == 0
    assert gone["prompt_tokens"] == 3 + (len(prompt) + 3) // 4 + 3  # the documented estimate of this prompt
    assert gone["cost"] == pytest.approx(gone["prompt_tokens"] * 2.0 / 1e6)
    assert unreached["route"] == "dead" and unreached["status"] == 502
    assert unreached["estimated"] == 0 and unreached["prompt_tokens"] == 0 and unreached["cost"] == 0


async def test_an_upstream_that_timed_out_with_the_request_bills_the_prompt_one_waiting_for_a_connection_nothing(
        upstream: FakeUpstream, tmp_path: Path):
    """An upstream that did not answer in time had the request (Sluice hung up on it, as when the client leaves,
    which bills the prompt), but the row said zero tokens and zero cost. One that timed out while waiting
    for a free connection never reached the upstream: still nothing."""
    import asyncio

    cfg = config(upstream)
    cfg["upstreams"]["demo"].update(timeouts={"first_byte": 1.0}, max_connections=1)
    prompt = "count this prompt please " * 10
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c:
            upstream.first_byte_delay = 30.0
            with pytest.raises(openai.APIStatusError) as exc:
                await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": prompt}])
            assert exc.value.status_code == 504 and len(upstream.requests) == 1
            # a stream holds the only connection while the next request waits for it past its deadline
            upstream.first_byte_delay, upstream.token_delay = 0.0, 0.5
            stream = await c.chat.completions.create(model="sluice-demo", stream=True, messages=[{"role": "user", "content": prompt}])
            await stream.__anext__()
            with pytest.raises(openai.APIStatusError) as exc:
                await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": prompt}])
            assert exc.value.status_code == 504
            await stream.close()
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    assert len(upstream.requests) == 2
    timed_out, streamed, never_sent = ledger_rows(tmp_path)
    assert timed_out["outcome"] == "upstream_error" and timed_out["estimated"] == 1 and timed_out["completion_tokens"] == 0
    assert timed_out["prompt_tokens"] == 3 + (len(prompt) + 3) // 4 + 3  # the documented estimate of this prompt
    assert timed_out["cost"] == pytest.approx(timed_out["prompt_tokens"] * 2.0 / 1e6)
    assert streamed["stream"] == 1
    assert never_sent["status"] == 504 and never_sent["estimated"] == 0 and never_sent["prompt_tokens"] == 0 and never_sent["cost"] == 0


def test_aiohttp_still_has_the_connector_paths_that_note_unsent_requests():
    """proxy.upstream's connector overrides these two private aiohttp methods; were they renamed, a cancelled
    request waiting for a connection would silently count as sent (and bill its prompt) again."""
    import inspect

    import aiohttp

    for name in ("_wait_for_available_connection", "_create_connection"):
        assert inspect.iscoroutinefunction(getattr(aiohttp.TCPConnector, name, None)), name


@pytest.mark.skipif(sys.platform != "linux", reason="a full accept queue holds a loopback handshake only on Linux")
async def test_client_gone_before_sluice_had_a_connection_bills_nothing(upstream: FakeUpstream, tmp_path: Path):
    """A request the upstream never saw bills nothing, even though its client left (which bills the prompt
    of one that was sent): one waited for the pool's only connection, held by another request; one waited
    for a connection to open (a listener whose queue is full never completes the handshake). The request
    holding the connection, sent and then left by its client, bills its prompt."""
    import socket

    from proxy.testing import wait_for

    upstream.first_byte_delay = 30.0
    cfg = config(upstream)
    cfg["upstreams"]["demo"]["max_connections"] = 1
    with socket.socket() as full, socket.socket() as filler:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler.connect(full.getsockname())  # the accept queue's one place: the next handshake waits
        cfg["upstreams"]["stuck"] = {"url": f"http://127.0.0.1:{full.getsockname()[1]}/v1", "models": ["sluice-demo"]}
        cfg["routes"].insert(0, {"name": "stuck", "match": {"path": "/stuck/"}, "upstream": "stuck",
                                 "chain": [{"metering": {}}]})
        prompt = "count this prompt please " * 10
        async with SluiceServer(cfg, tmp_path) as s:
            pool = s.server.generation.pool
            async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c, \
                    openai.AsyncOpenAI(base_url=s.origin + "/stuck", api_key="sk-test", max_retries=0) as stuck:
                def ask(client: openai.AsyncOpenAI) -> asyncio.Future:
                    return asyncio.ensure_future(client.chat.completions.create(
                        model="sluice-demo", messages=[{"role": "user", "content": prompt}]))

                holder = ask(c)
                await upstream.wait_for(lambda: len(upstream.requests) == 1)
                waiter, connecting = ask(c), ask(stuck)
                await wait_for(lambda: pool.get("demo").outstanding == 2 and pool.get("stuck").outstanding == 1,
                               timeout=10, what="both requests waiting for a connection")
                for call in (waiter, connecting, holder):
                    call.cancel()  # the clients go away
                    with pytest.raises(asyncio.CancelledError):
                        await call
                await s.wait_idle()
            await s.runtime.state.records("ledger").flush()
    rows = ledger_rows(tmp_path)
    assert len(upstream.requests) == 1 and len(rows) == 3
    sent = [r for r in rows if r["estimated"]]
    assert len(sent) == 1 and sent[0]["prompt_tokens"] > 0 and sent[0]["cost"] > 0, rows
    unsent = [r for r in rows if not r["estimated"]]
    assert sorted(r["route"] for r in unsent) == ["main", "stuck"], rows
    for r in unsent:
        assert (r["outcome"], r["prompt_tokens"], r["completion_tokens"], r["cost"]) == ("client_gone", 0, 0, 0), r


def test_price_lookup_falls_back_only_for_dated_snapshots(caplog):
    from plugins._usage import PriceTable

    t = PriceTable.build()
    # dated snapshots, as OpenAI names them, are priced as their model
    for name, model in [("gpt-4o-2024-08-06", "gpt-4o"), ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"), ("o1-2024-12-17", "o1"),
                        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"), ("openai/gpt-4.1-2025-04-14", "gpt-4.1"),
                        ("o3-mini-2025-01-31", "o3-mini"), ("gpt-5@2025-08-07", "gpt-5")]:
        assert t.lookup(name).model == model, name
    # another model that only starts with a known name is not that model
    for name in ("o3-deep-research", "gpt-4o-realtime-preview", "gpt-4o-audio-preview", "gpt-4.1-turbo", "gpt-5-codex",
                 "gpt-4o:latest", "gpt-4o-2024", "gpt-4o-20240806x", "o3-mini-high"):
        assert t.lookup(name) is None, name
    # the common ones the old rule mispriced have their own entries, dated like the rest
    assert t.lookup("o1-mini").model == "o1-mini" and t.lookup("o1-mini").input == pytest.approx(1.10e-6)
    assert t.lookup("o1-mini-2024-09-12").model == "o1-mini"
    assert t.lookup("o1-pro").output == pytest.approx(600e-6) and t.lookup("o3-pro").output == pytest.approx(80e-6)
    # the first gpt-4o snapshot kept its own, higher price
    assert t.lookup("gpt-4o-2024-05-13").input == pytest.approx(5e-6)


def test_an_unpriced_model_is_logged_once(caplog):
    import logging

    from plugins._usage import PriceTable

    t = PriceTable.build()
    with caplog.at_level(logging.WARNING, logger="sluice.metering"):
        for _ in range(3):
            assert t.lookup("my-local-llama") is None
            assert t.lookup("gpt-4o") is not None
    (rec,) = [r for r in caplog.records if "no price" in r.getMessage()]
    assert "'my-local-llama'" in rec.getMessage() and "budgets" in rec.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sluice.metering"):
        assert t.lookup("x" * 5000) is None
    assert len(caplog.records) == 1 and len(caplog.records[0].getMessage()) < 300  # a client's long name is cut
    star = PriceTable.build({"*": {"input": 1}})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sluice.metering"):
        assert star.lookup("my-local-llama") is not None
    assert caplog.records == []


def word_tokenizer(path: Path) -> str:
    """A real tokenizer.json that knows two words and fails on any other (no unknown token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "there": 1}))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


async def test_a_tokenizer_that_cannot_load_fails_at_start(tmp_path: Path):
    from plugins.metering import Metering
    from proxy import ConfigError
    from proxy.testing import configure_plugin, make_runtime

    rt = await make_runtime(tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"metering: tokenizers\.sluice-\*: cannot load .*missing\.json"):
            await configure_plugin(Metering, {"tokenizers": {"sluice-*": str(tmp_path / "missing.json")}}, runtime=rt)
        (tmp_path / "bad.json").write_text("{not json")
        with pytest.raises(ConfigError, match=r"tokenizers\.x: cannot load"):
            await configure_plugin(Metering, {"tokenizers": {"x": str(tmp_path / "bad.json")}}, runtime=rt)
        ok = await configure_plugin(Metering, {"tokenizers": {"x": word_tokenizer(tmp_path / "tok.json")}}, runtime=rt)
        await ok.stop()
    finally:
        await rt.close_all()


KEY = "sk-metering-audit-key-1"
AUTH = {"auth": {"keys": [{"key": KEY, "id": "k1", "name": "alice-laptop", "team": "red", "user": "alice"}],
                 "virtual_keys": False}}


async def test_a_tokenizer_failing_on_a_request_falls_back_to_the_estimate(upstream: FakeUpstream, tmp_path: Path, caplog):
    """Budgets still reserve and the row is still written, counted by bytes and marked estimated."""
    upstream.malformed_usage = True  # no usage: the ledger row must be counted by Sluice
    tok = word_tokenizer(tmp_path / "tok.json")
    cfg = config(upstream, [AUTH], tokenizers={"sluice-*": tok}, budgets=[{"scope": "key", "period": "day", "limit": 100.0}])
    prompt = "hello unknown words"
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY, max_retries=0) as c:
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": prompt}], max_tokens=4)
            await s.wait_idle()
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
            async with http.get(f"{s.admin_url}/admin/budgets", params={"key": "k1"}) as r:
                (budget,) = (await r.json())["budgets"]
        await s.runtime.state.records("ledger").flush()
    (row,) = ledger_rows(tmp_path)
    assert row["estimated"] == 1 and row["prompt_tokens"] == 3 + (len(prompt) + 3) // 4 + 3
    assert budget["spent_and_reserved"] == pytest.approx(row["cost"]) and row["cost"] > 0
    # neither hook failed: admission reserved (no fail-open), on_done wrote and reconciled
    assert not [r for r in caplog.records if "plugin metering failed" in r.getMessage()]


@pytest.mark.parametrize("workers, redis, warned", [(2, False, True), (1, False, False),
                                                    pytest.param(4, True, False, marks=pytest.mark.redis)])
async def test_budgets_per_process_with_several_workers_are_warned_of(tmp_path: Path, caplog, request, workers, redis, warned):
    import logging

    from plugins.metering import Metering
    from proxy.testing import configure_plugin, make_runtime

    url = request.getfixturevalue("redis_server").url if redis else None
    rt = await make_runtime(tmp_path, redis_url=url, config={"server": {"workers": workers}})
    try:
        with caplog.at_level(logging.WARNING, logger="sluice.metering"):
            p = await configure_plugin(Metering, {"ledger": False, "budgets": [{"scope": "key", "period": "day", "limit": 5}]},
                                       runtime=rt)
            await configure_plugin(Metering, {"ledger": False}, runtime=rt)  # no budget rules: nothing to warn of
        msgs = [r.getMessage() for r in caplog.records if "budgets" in r.getMessage()]
        if warned:
            (msg,) = msgs
            assert f"server.workers is {workers}" in msg and f"up to {workers} times" in msg and "state.redis" in msg
        else:
            assert msgs == []
        await p.stop()
    finally:
        await rt.close_all()


async def test_ledger_identity_and_cached_and_reasoning_columns(upstream: FakeUpstream, tmp_path: Path):
    """The ledger's who-columns come from auth's identity (never the key), and cached and
    reasoning tokens from the upstream's usage details, cached ones priced at cached_input."""
    answer = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "sluice-demo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050,
                  "prompt_tokens_details": {"cached_tokens": 600}, "completion_tokens_details": {"reasoning_tokens": 30}},
    }
    async with SluiceServer(config(upstream, [AUTH]), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY, max_retries=0) as c:
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "plain"}])
            # FakeUpstream answers the next request with this body (its way to set a given answer)
            upstream.fail_next(200, body=answer)
            r = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "cached"}])
            assert r.usage.prompt_tokens_details.cached_tokens == 600
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    plain, cached = ledger_rows(tmp_path)
    for row in (plain, cached):
        assert (row["key_id"], row["key_name"], row["team"], row["user"]) == ("k1", "alice-laptop", "red", "alice")
        assert row["model_requested"] == "sluice-demo" and row["model_served"] == "sluice-demo"
        assert KEY not in str(row)
    assert plain["cached_tokens"] == 0 and plain["reasoning_tokens"] == 0
    assert (cached["prompt_tokens"], cached["cached_tokens"], cached["completion_tokens"], cached["reasoning_tokens"]) == (1000, 600, 50, 30)
    assert cached["estimated"] == 0
    assert cached["cost"] == pytest.approx((400 * 2.0 + 600 * 1.0 + 50 * 8.0) / 1e6)


async def test_model_requested_is_what_the_client_asked_when_a_router_chose_another(upstream: FakeUpstream, tmp_path: Path):
    """The complexity router writes its choice into the body; the ledger still says what was asked."""
    router = {"router": {"complexity": {"model": "auto", "small": "sluice-demo", "large": "sluice-demo"}}}
    async with SluiceServer(config(upstream, [router]), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as client:
            out = await client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
        assert out.model == "sluice-demo"
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    assert upstream.requests[-1].json["model"] == "sluice-demo"
    (row,) = ledger_rows(tmp_path)
    assert (row["model_requested"], row["model_served"]) == ("auto", "sluice-demo")


async def test_model_served_is_the_answers_own_for_streams_too(upstream: FakeUpstream, tmp_path: Path):
    """An upstream answers a model name with its dated snapshot; the ledger records that for a stream
    (from its events) as for a buffered answer (from its body)."""
    upstream.answer_model = "sluice-demo-2026-01-01"
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as client:
            ask = {"model": "sluice-demo", "messages": [{"role": "user", "content": "hi"}]}
            await client.chat.completions.create(**ask)
            _ = [c async for c in await client.chat.completions.create(stream=True, **ask)]
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    rows = ledger_rows(tmp_path)
    assert [(r["stream"], r["model_requested"], r["model_served"]) for r in rows] == [
        (0, "sluice-demo", "sluice-demo-2026-01-01"), (1, "sluice-demo", "sluice-demo-2026-01-01")]


async def test_admin_budgets_of_a_team_with_a_colon_and_usage_of_unknown_ledgers(upstream: FakeUpstream, tmp_path: Path):
    auth = {"auth": {"keys": [{"key": "sk-colon-team-key-0001", "id": "k1", "team": "red:eu"}], "virtual_keys": False}}
    budgets = [{"scope": "key", "period": "day", "limit": 5.0}, {"scope": "team", "period": "month", "limit": 50.0}]
    async with SluiceServer(config(upstream, [auth], budgets=budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-colon-team-key-0001", max_retries=0) as client:
            await client.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}])
        await s.wait_idle()
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
            async with http.get(f"{s.admin_url}/admin/budgets", params={"key": "k1", "team": "red:eu"}) as r:
                assert r.status == 200
                found = {b["scope"]: b for b in (await r.json())["budgets"]}
            # a name no metering instance writes would open a new file and writer thread per name
            async with http.get(f"{s.admin_url}/admin/usage", params={"ledger": "other"}) as r:
                assert r.status == 400 and r.headers["x-request-id"]
                assert "ledger must be one of: ledger" in (await r.json())["error"]["message"]
            async with http.get(f"{s.admin_url}/admin/usage", params={"ledger": "ledger"}) as r:
                assert r.status == 200 and (await r.json())["rows"]
    assert (found["key"]["id"], found["key"]["period"]) == ("k1", "day")
    assert (found["team"]["id"], found["team"]["period"]) == ("red:eu", "month")
    assert found["key"]["spent_and_reserved"] > 0
    assert not (tmp_path / "other.db").exists()


async def test_a_stream_cut_before_it_finished_keeps_the_answers_model(upstream: FakeUpstream, tmp_path: Path):
    """The model and id come from the stream's first piece too: a stream that never sent its finishing
    event is priced and recorded as the model that answered, like a finished one."""
    upstream.answer_model = "sluice-demo-2026-01-01"
    upstream.drop_after = 3  # the upstream goes away mid-stream
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as client:
            with pytest.raises(openai.APIError):
                _ = [c async for c in await client.chat.completions.create(
                    model="sluice-demo", stream=True, messages=[{"role": "user", "content": "a b c d e"}])]
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    (row,) = ledger_rows(tmp_path)
    assert (row["model_served"], row["estimated"]) == ("sluice-demo-2026-01-01", 1), row


async def test_a_big_prompt_is_reserved_at_the_tokenizers_count(upstream: FakeUpstream, tmp_path: Path):
    """Over 32 KiB a configured tokenizer counts a budget's prompt (in the executor, not on the loop), and the
    same count serves the row's estimate when the upstream gives no usage. The limit lies between the
    tokenizer's reservation and the byte estimate's: without the tokenizer the same request is refused."""
    upstream.malformed_usage = True
    prompt = "hello there " * 4000  # 48,000 bytes: 8,000 tokens for the tokenizer, about 12,000 for the estimate
    tokens = 3 + 8000 + 3  # the chat format's overhead around the message's tokens
    budget = [{"scope": "key", "period": "day", "limit": 0.02}]  # 8,006 x $2/M = 0.016; 12,006 x $2/M = 0.024
    tok = word_tokenizer(tmp_path / "tok.json")
    for tokenizers, admitted in (({"sluice-*": tok}, True), ({}, False)):
        state = tmp_path / ("tok" if tokenizers else "bytes")
        async with SluiceServer(config(upstream, [AUTH], tokenizers=tokenizers, budgets=budget), state) as s:
            (metering,) = [p for p in s.server.generation.plugins if p.name == "metering"]
            # with a tokenizer the admission can await the executor; without, it runs to its end on the spot
            assert asyncio.iscoroutinefunction(metering.on_request) is bool(tokenizers)
            async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY, max_retries=0) as c:
                call = c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=4)
                if admitted:
                    await call
                else:
                    with pytest.raises(openai.RateLimitError) as e:
                        await call
                    assert e.value.code == "insufficient_quota"
                await s.wait_idle()
            async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
                async with http.get(f"{s.admin_url}/admin/budgets", params={"key": "k1"}) as r:
                    (spent,) = (await r.json())["budgets"]
            await s.runtime.state.records("ledger").flush()
        if admitted:
            (row,) = ledger_rows(state)
            assert row["estimated"] == 1 and row["prompt_tokens"] == tokens
            # reserved at admission (a failed admission would have admitted it with nothing reserved) and
            # reconciled to the row's cost at the end
            assert spent["spent_and_reserved"] == pytest.approx(row["cost"]) and row["cost"] > 0
        else:
            assert spent["spent_and_reserved"] == 0


async def test_a_cut_streams_big_prompt_is_estimated_by_the_tokenizer_without_budgets(upstream: FakeUpstream,
                                                                                       tmp_path: Path):
    """No budget counted the prompt at admission, and the upstream cut the stream before its usage: the
    row's estimate counts the 48 KB prompt with the configured tokenizer, in the executor (the runtime's
    thread pool is watched), not on the event loop. metering's on_done stays a plain function: for this
    one request it hands the core a coroutine, and the observers after it (metrics here) run once the
    count is made, so they count the same estimate. A small prompt is counted on the spot."""
    from tests.plugins.test_metrics import scrape, value

    upstream.drop_after = 3
    big, small = "hello there " * 4000, "hello there " * 10  # 48,000 bytes (8,000 tokens) and 120
    tok = word_tokenizer(tmp_path / "tok.json")
    cfg = config(upstream, tokenizers={"sluice-*": tok})
    cfg["routes"][0]["chain"].append({"metrics": {}})
    async with SluiceServer(cfg, tmp_path) as s:
        (metering,) = [p for p in s.server.generation.plugins if p.name == "metering"]
        assert not asyncio.iscoroutinefunction(metering.on_done)
        pool = WatchedPool.install(s.runtime, metering.runtime)  # the runtime, and the generation's view of it
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c:
            for prompt in (big, small):
                with pytest.raises(openai.APIError):
                    stream = await c.chat.completions.create(
                        model="sluice-demo", messages=[{"role": "user", "content": prompt}], stream=True)
                    async for _ in stream:
                        pass
                await s.wait_idle()
        assert pool.ran == ["_prompt_tokens"]  # the big prompt's count, and only that
        await s.runtime.state.records("ledger").flush()
        sm = await scrape(s)
    rows = ledger_rows(tmp_path)
    assert [r["estimated"] for r in rows] == [1, 1] and all(r["completion_tokens"] > 0 for r in rows), rows
    counted = {r["prompt_tokens"] for r in rows}
    assert counted == {3 + 8000 + 3, 3 + 20 + 3}  # the chat format's overhead around each message's tokens
    assert value(sm, "sluice_tokens_total", type="input") == sum(counted)


class Timed(Plugin):
    """Asks for hook timings, as metrics does, and keeps each request's."""

    name = "timed_probe"
    wants_plugin_timings = True
    seen: ClassVar[list[set[str]]] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        self.seen.append(set(ctx.timings.plugins))


async def test_without_budgets_metering_has_no_admission_hook(upstream: FakeUpstream, tmp_path: Path):
    """No budget rule and no identity budgets: nothing to reserve, so no on_request for the core to call
    and time; with either kind of budget (identity budgets are on by default), the hook is there and timed."""
    Timed.seen.clear()
    cases = {"none": {"budgets": [], "identity_budgets": False}, "identity": {"budgets": []},
             "rule": {"budgets": [{"scope": "key", "period": "day", "limit": 100.0}], "identity_budgets": False}}
    with register_plugin(Timed):
        for name, metering in cases.items():
            async with SluiceServer(config(upstream, [AUTH, {"timed_probe": {}}], **metering), tmp_path / name) as s:
                (plugin,) = [p for p in s.server.generation.plugins if p.name == "metering"]
                assert (plugin.on_request is None) == (name == "none")
                async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY, max_retries=0) as c:
                    await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}])
                await s.wait_idle()
            assert ("metering.on_request" in Timed.seen[-1]) == (name != "none"), name
            assert "auth.on_request" in Timed.seen[-1]
    rows = ledger_rows(tmp_path / "none")
    assert len(rows) == 1 and rows[0]["key_id"] == "k1"


async def test_calls_without_tokens_are_not_marked_estimated(upstream: FakeUpstream, tmp_path: Path):
    """A model list or a speech call reaches the upstream and gets its row, with no tokens to estimate: not
    marked estimated (which `sluice usage` counts); a chat answer without usage still is."""
    upstream.malformed_usage = True  # the chat answer's usage cannot be read: estimated
    async with SluiceServer(config(upstream, [AUTH]), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY, max_retries=0) as c:
            models = await c.models.list()
            assert [m.id async for m in models]
            speech = await c.audio.speech.create(model="sluice-demo", voice="alloy", input="hello")
            assert speech.content
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}])
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    rows = {r["endpoint"]: r for r in ledger_rows(tmp_path)}
    assert set(rows) == {"models", "audio/speech", "chat/completions"}
    for endpoint in ("models", "audio/speech"):
        r = rows[endpoint]
        assert (r["estimated"], r["prompt_tokens"], r["completion_tokens"], r["cost"]) == (0, 0, 0, 0.0), r
    assert rows["chat/completions"]["estimated"] == 1 and rows["chat/completions"]["prompt_tokens"] > 0


async def test_a_timed_out_attempt_that_had_the_request_bills_its_prompt_whatever_the_fallback_did(tmp_path: Path):
    """The first target had the request and did not answer in time (it bills the prompt); the route then fell
    back to a target that answered 503. Only the last attempt was looked at, so the row said zero tokens and
    zero cost, though the same timeout with no fallback behind it bills the prompt."""
    async with FakeUpstream() as slow, FakeUpstream() as failing:
        slow.first_byte_delay = 30.0
        failing.fail_next(503)
        cfg = config(slow)
        cfg["upstreams"]["demo"]["timeouts"] = {"first_byte": 1.0}
        cfg["upstreams"]["other"] = {"url": failing.url, "models": ["sluice-demo"]}
        cfg["routes"][0]["upstream"] = ["demo", "other"]
        prompt = "count this prompt please " * 10
        async with SluiceServer(cfg, tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c:
                with pytest.raises(openai.APIStatusError) as exc:
                    await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": prompt}])
                assert exc.value.status_code == 503
            await s.wait_idle()
            await s.runtime.state.records("ledger").flush()
        assert len(slow.requests) == 1 and len(failing.requests) == 1
    (row,) = ledger_rows(tmp_path)
    assert row["estimated"] == 1 and row["completion_tokens"] == 0
    assert row["prompt_tokens"] == 3 + (len(prompt) + 3) // 4 + 3
    assert row["cost"] == pytest.approx(row["prompt_tokens"] * 2.0 / 1e6)


@pytest.mark.parametrize("n, events, finished, expected", [
    (None, 5, 1, 3),  # one choice: its role event and its finish event carry no token
    (4, 4 + 12 + 4, 4, 12),  # four choices, three tokens each: four role and four finish events taken off
    (2, 2 + 5, 0, 5),  # cut before any choice finished
    (8, 3, 0, 0),  # never below zero
])
def test_a_cut_streams_estimate_takes_off_every_choices_role_and_finish_events(n, events, finished, expected):
    """With n > 1 only one role and one finish event were taken off: the "lower bound" over-counted by
    2(n-1) tokens, in the ledger and in the tokens-per-minute limit alike."""
    from plugins._usage import estimate_completion_tokens_from_stream
    from proxy.context import StreamEnd
    from proxy.testing import make_context

    body = {"model": "m", "messages": [], "stream": True, **({"n": n} if n else {})}
    ctx = make_context(body)
    ctx.stream_events = events
    ctx.stream_end = StreamEnd("m", "c", reasons={i: "stop" for i in range(finished)})
    assert estimate_completion_tokens_from_stream(ctx) == expected
