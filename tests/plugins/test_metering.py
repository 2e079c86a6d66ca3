"""Metering: usage, cost and the ledger, through a real server, with the openai SDK as client."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path
from typing import ClassVar

import aiohttp
import openai
import pytest

from plugins._usage import PriceTable
from plugins.metering import RESERVED, Metering, ledger_table, period_window, render, usage_query, utc_day
from proxy import Context, Event, Plugin, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context, make_runtime, register_plugin, wait_for

PRICES = {"sluice-demo": {"input": 2.0, "cached_input": 1.0, "output": 8.0}}


def config(upstream: FakeUpstream, **metering) -> dict:
    return {
        "upstreams": {"demo": {"url": upstream.url, "models": ["sluice-demo"]}},
        "prices": PRICES,
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "demo", "chain": [{"metering": metering}]}],
    }


def ledger_rows(tmp_path: Path) -> list[dict]:
    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY ts")]
    finally:
        conn.close()


def client(s: SluiceServer, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0, **kw)


async def test_buffered_and_streamed_rows_with_upstream_usage(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            r = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hello there"}])
            chunks = [ch async for ch in await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": "stream me"}], stream=True)]
        # the client did not ask for usage: it gets none, though Sluice asked the upstream for it
        assert all(ch.usage is None for ch in chunks)
        assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    rows = ledger_rows(tmp_path)
    assert len(rows) == 2
    buffered, streamed = rows
    assert buffered["prompt_tokens"] == r.usage.prompt_tokens
    assert buffered["completion_tokens"] == r.usage.completion_tokens
    assert buffered["estimated"] == 0 and streamed["estimated"] == 0
    assert buffered["cost"] == pytest.approx((r.usage.prompt_tokens * 2 + r.usage.completion_tokens * 8) / 1e6)
    assert streamed["stream"] == 1 and streamed["completion_tokens"] > 0 and streamed["ttft_ms"] > 0
    for row in rows:
        assert row["route"] == "main" and row["upstream"] == "demo" and row["model_served"] == "sluice-demo"
        assert row["status"] == 200 and row["outcome"] == "ok" and row["priced"] == 1 and row["currency"] == "USD"
        assert row["latency_ms"] > 0 and row["attempts"] == 1


async def test_client_asking_for_usage_still_gets_it(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            chunks = [ch async for ch in await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": "x"}], stream=True,
                stream_options={"include_usage": True})]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        await s.wait_idle()
    rows = ledger_rows(tmp_path)
    assert rows[0]["completion_tokens"] == chunks[-1].usage.completion_tokens and rows[0]["estimated"] == 0


async def test_continuous_usage_asked_alone_stays_off(upstream: FakeUpstream, tmp_path: Path):
    # vLLM streams a running usage only with include_usage; once Sluice added that, every chunk got one
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            raw = await c.chat.completions.with_raw_response.create(
                model="sluice-demo", messages=[{"role": "user", "content": "x y z"}], stream=True,
                stream_options={"continuous_usage_stats": True})  # type: ignore[typeddict-unknown-key]
            events = [line async for line in raw.http_response.aiter_lines() if line.startswith("data: {")]
        assert len(events) > 3 and not any('"usage"' in e for e in events)
        assert upstream.requests[-1].json["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    (row,) = ledger_rows(tmp_path)
    assert row["completion_tokens"] > 0 and row["estimated"] == 0


async def test_client_gone_mid_stream_is_estimated(upstream: FakeUpstream, tmp_path: Path):
    upstream.token_delay = 0.01
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            stream = await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": "a long answer please " * 20}], stream=True,
                max_tokens=200)
            got = 0
            async for _ in stream:
                got += 1
                if got == 5:
                    break
            await stream.close()
        await s.wait_idle()
    rows = ledger_rows(tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert row["estimated"] == 1
    assert row["prompt_tokens"] > 20 and 1 <= row["completion_tokens"] <= 200
    assert row["cost"] > 0


class Holder(Plugin):
    """A stream guard that lets a stream's first event through and holds every later one (as pii holds
    a word it cannot yet judge), keeping what it saw."""

    name = "holder"
    seen: ClassVar[list[str]] = []

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> list[Event] | None:
        self.seen.append(event.data)
        return None if len(self.seen) == 1 else []


async def test_client_gone_while_a_guard_holds_text_bills_what_the_upstream_sent(upstream: FakeUpstream, tmp_path: Path):
    # the upstream sends 8 events and then waits; the guard passes the first and holds 7, so the client has
    # one event when it leaves: the row estimates from the 8 the upstream generated, not the client's one
    upstream.stall_after = 8
    Holder.seen.clear()
    conf = config(upstream)
    conf["routes"][0]["chain"].insert(0, {"holder": {}})
    with register_plugin(Holder):
        async with SluiceServer(conf, tmp_path) as s:
            async with client(s) as c:
                stream = await c.chat.completions.create(
                    model="sluice-demo", messages=[{"role": "user", "content": "a long answer please " * 20}], stream=True)
                first = await stream.__aiter__().__anext__()
                await wait_for(lambda: len(Holder.seen) == 8, 10, "the guard to see eight events")
                await stream.close()
            await s.wait_idle()
    (row,) = ledger_rows(tmp_path)
    assert first.choices[0].delta.role == "assistant"
    assert row["outcome"] == "client_gone" and row["estimated"] == 1
    # eight events less the role's (the stream never got to its finish event) is 7 tokens; before, 0
    assert row["completion_tokens"] == 7


async def test_a_whole_stream_without_usable_usage_is_estimated_at_one_token_a_content_event(upstream: FakeUpstream, tmp_path: Path):
    """The raw relay counted [DONE] as an event: a whole stream whose usage was unusable was estimated a
    token over the content events (the estimate is meant as a lower bound)."""
    msgs = [{"role": "user", "content": "one two three four five"}]
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            exact = (await c.chat.completions.create(model="sluice-demo", messages=msgs)).usage.completion_tokens
            upstream.malformed_usage = True
            chunks = [ch async for ch in await c.chat.completions.create(model="sluice-demo", messages=msgs, stream=True)]
        await s.wait_idle()
    content = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    rows = ledger_rows(tmp_path)
    assert rows[1]["estimated"] == 1 and rows[1]["outcome"] == "ok"
    assert rows[1]["completion_tokens"] == len(content) == exact


async def test_client_gone_mid_stream_outcome(upstream: FakeUpstream, tmp_path: Path):
    upstream.token_delay = 0.01
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            stream = await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": "long " * 50}], stream=True)
            async for _ in stream:
                break
            await stream.close()
        await s.wait_idle()
    (row,) = ledger_rows(tmp_path)
    assert row["outcome"] == "client_gone"


async def test_upstream_failure_is_a_row_with_no_tokens(upstream: FakeUpstream, tmp_path: Path):
    upstream.fail_next(500)
    async with SluiceServer(config(upstream), tmp_path) as s:
        with pytest.raises(openai.InternalServerError):
            async with client(s) as c:
                await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
    (row,) = ledger_rows(tmp_path)
    assert row["status"] == 500 and row["outcome"] == "upstream_error"
    assert row["prompt_tokens"] == 0 and row["cost"] == 0 and row["estimated"] == 0


async def test_no_usage_from_upstream_counts_and_marks_estimated(upstream: FakeUpstream, tmp_path: Path):
    upstream.malformed_usage = True
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "count me please"}])
        await s.wait_idle()
    (row,) = ledger_rows(tmp_path)
    assert row["estimated"] == 1 and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


async def test_price_overrides_and_unpriced_models(upstream: FakeUpstream, tmp_path: Path):
    cfg = config(upstream, prices={"sluice-demo": {"input": 1000.0, "output": 0.0}})
    async with SluiceServer(cfg, tmp_path) as s:
        async with client(s) as c:
            r = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
    (row,) = ledger_rows(tmp_path)
    assert row["cost"] == pytest.approx(r.usage.prompt_tokens * 1000 / 1e6)
    cfg = config(upstream)
    cfg["prices"] = {}
    async with SluiceServer(cfg, tmp_path / "b") as s:
        async with client(s) as c:
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
    (row,) = ledger_rows(tmp_path / "b")
    assert row["priced"] == 0 and row["cost"] == 0


async def test_an_answer_naming_an_unpriced_model_costs_what_the_model_asked_for_costs(upstream: FakeUpstream, tmp_path: Path, caplog):
    """A model server that answers with a name the price table does not know (vLLM's model path, an alias)
    made the request cost 0, in the ledger and in spend budgets, although the model it was sent to has a price
    (and its reservation was made at that price)."""
    upstream.answer_model = "/models/sluice-demo-awq"
    cfg = config(upstream, prices={"sluice-demo": {"input": 1000.0, "output": 0.0}})
    async with SluiceServer(cfg, tmp_path) as s:
        async with client(s) as c:
            r = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
    assert r.model == "/models/sluice-demo-awq"
    (row,) = ledger_rows(tmp_path)
    assert row["model_served"] == "/models/sluice-demo-awq" and row["priced"] == 1
    assert row["cost"] == pytest.approx(r.usage.prompt_tokens * 1000 / 1e6)
    assert "no price for model" not in caplog.text  # it was priced
    # with a "*" price for unknown models, the model it was sent to still prices it (not the "*" price)
    cfg = config(upstream, prices={"sluice-demo": {"input": 1000.0, "output": 0.0}, "*": {"input": 1.0, "output": 1.0}})
    async with SluiceServer(cfg, tmp_path / "b") as s:
        async with client(s) as c:
            r = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
    (row,) = ledger_rows(tmp_path / "b")
    assert row["cost"] == pytest.approx(r.usage.prompt_tokens * 1000 / 1e6)


async def test_usage_admin_endpoint_groups_and_formats(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with client(s) as c:
            for _ in range(3):
                await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
        headers = {"authorization": f"Bearer {s.admin_token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{s.admin_url}/admin/usage", params={"group_by": "model,day"}) as r:
                assert r.status == 200
                data = await r.json()
            async with http.get(f"{s.admin_url}/admin/usage", params={"group_by": "model", "format": "csv"}) as r:
                text = await r.text()
            async with http.get(f"{s.admin_url}/admin/usage", params={"group_by": "password"}) as r:
                assert r.status == 400
            # a line break in the value (quoted in the message) was a 500: an HTTP reason cannot hold one
            async with http.get(f"{s.admin_url}/admin/usage", params={"group_by": "a\nb"}) as r:
                assert r.status == 400 and "'a\\nb'" in (await r.json())["error"]["message"]
            async with aiohttp.ClientSession() as anon, anon.get(f"{s.admin_url}/admin/usage") as r:
                assert r.status == 401
    (row,) = data["rows"]
    assert row["model"] == "sluice-demo" and row["requests"] == 3 and row["cost"] > 0
    assert list(csv.DictReader(io.StringIO(text)))[0]["requests"] == "3"


def test_usage_query_rejects_unknown_groups_and_renders():
    with pytest.raises(ValueError, match="cannot group by 'secret'"):
        usage_query(["secret"])
    sql, params = usage_query(["key", "day"], since=1.0, key="k1")
    assert "GROUP BY 1, 2" in sql and params == [1.0, "1970-01-01", "k1"]
    rows = [{"key": "k1", "requests": 2, "cost": 0.5}]
    assert "k1" in render(rows, "table") and json.loads(render(rows, "json")) == rows
    assert render(rows, "csv").splitlines()[0] == "key,requests,cost"
    # a model name is the client's: a terminal escape in it is shown, not sent (it cleared the screen, forged rows)
    hostile = [{"model": "\x1b[2J\x1b[31mFAKE-ROW 999\x07 café\n2nd line", "requests": 1, "cost": 0.5}]
    for fmt in ("table", "csv"):
        out = render(hostile, fmt)
        assert "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out and "café" in out, fmt
        assert len(out.strip().splitlines()) == (3 if fmt == "table" else 2), fmt
    assert json.loads(render(hostile, "json")) == hostile  # JSON escapes them itself


def test_usage_query_time_bounds_use_the_day_index_and_change_no_answer(tmp_path):
    """A --since/--until report reads the ledger through its day index, with the same sums as a scan."""
    db = sqlite3.connect(tmp_path / "usage.db")
    t = ledger_table()
    db.execute(f"CREATE TABLE {t.name} ({', '.join(t.columns)}, PRIMARY KEY (id))")
    for i, idx in enumerate(t.indexes):
        db.execute(f"CREATE INDEX i{i} ON {t.name} ({', '.join(idx)})")
    day0 = 1767225600.0  # 2026-01-01T00:00:00Z
    rows = [(f"r{i}", day0 + i * 3600.0 - 0.5, utc_day(day0 + i * 3600.0 - 0.5), f"k{i % 3}", i * 0.25) for i in range(24 * 5)]
    db.executemany(f"INSERT INTO {t.name} (id, ts, day, key_id, cost) VALUES (?, ?, ?, ?, ?)", rows)
    bounds = ((day0 + 86400, day0 + 3 * 86400), (day0 + 3600 - 0.5, None), (None, day0 + 7200.0), (day0 - 1, day0 + 0.5),
              (day0 - 400_000 * 86400.0, None), (None, 1e12), (-1e12, 253402300799.5))  # bounds beyond the years a row can have
    for group, (since, until) in [(g, b) for g in ("key", "team", "day") for b in bounds]:
        sql, params = usage_query([group], since, until)
        plan = " ".join(str(r) for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX" in plan and "day" in plan, plan
        got = {r[0]: (r[1], r[6]) for r in db.execute(sql, params)}
        want: dict[str | None, list] = {}
        for _, ts, day, key, cost in rows:
            if (since is None or ts >= since) and (until is None or ts < until):
                w = want.setdefault({"key": key, "team": None, "day": day}[group], [0, 0.0])
                w[0] += 1
                w[1] += cost
        assert got == {k: (n, round(c, 9)) for k, (n, c) in want.items()}


def test_period_windows_are_utc_calendar_periods():
    # 2025-12-31T23:59:59Z
    label, end = period_window("day", 1767225599.0)
    assert label == "2025-12-31" and end == 1767225600.0
    label, end = period_window("month", 1767225599.0)
    assert label == "2025-12" and end == 1767225600.0


def test_price_table_matching():
    t = PriceTable.build({"my-model": {"input": 1, "output": 2}})
    assert t.lookup("gpt-4o-2024-08-06").model == "gpt-4o"
    assert t.lookup("gpt-4o-mini-2024-07-18").model == "gpt-4o-mini"
    assert t.lookup("openai/gpt-4.1").model == "gpt-4.1"
    assert t.lookup("gpt-4oo") is None and t.lookup(None) is None
    assert t.lookup("my-model").output == pytest.approx(2e-6)
    star = PriceTable.build({"*": {"input": 1}})
    assert star.lookup("anything").input == pytest.approx(1e-6)


def test_config_errors_are_readable():
    with pytest.raises(Exception, match=r"prices\.x: input: Field required; inp: unknown field"):
        Metering.Config.model_validate({"prices": {"x": {"inp": 1}}})
    with pytest.raises(Exception, match="two budgets for scope key and period day"):
        Metering.Config.model_validate({"budgets": [{"scope": "key", "period": "day", "limit": 1},
                                                     {"scope": "key", "period": "day", "limit": 2}]})
    with pytest.raises(Exception, match="greater than 0"):
        Metering.Config.model_validate({"budgets": [{"scope": "key", "period": "day", "limit": 0}]})


async def test_early_answer_leaves_no_reservation_and_no_row(tmp_path: Path):
    from proxy import Identity

    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Metering, {"budgets": [{"scope": "key", "period": "day", "limit": 1}]}, runtime=rt)
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        # the same request not answered is reserved: only the answer below can keep the other from it
        plain = make_context(body, runtime=rt, identity=Identity(key_id="k1"))
        p.on_request(plain)  # budgets on this process's counters: plain hooks, finished on return
        assert [key for key, _, _ in plain.stash[RESERVED]] == [p.applicable(plain, time.time())[0][0]]
        ctx = make_context(body, runtime=rt, identity=Identity(key_id="k1"))
        ctx.reply(403, {"error": {"message": "no"}}, reason="blocked")
        p.on_request(ctx)
        assert ctx.stash.get(RESERVED) is None
        p.on_done(ctx)
        await rt.state.records("ledger").flush()
        rows = await rt.state.records("ledger").query("SELECT COUNT(*) AS n FROM ledger")
        assert rows[0]["n"] == 0
        await p.stop()
    finally:
        await rt.close_all()



async def test_sluice_usage_command_reads_the_ledger(upstream: FakeUpstream, tmp_path: Path):
    import subprocess
    import sys

    import yaml

    cfg = config(upstream)
    async with SluiceServer(cfg, tmp_path) as s:
        async with client(s) as c:
            for _ in range(2):
                await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
    cfg["state"] = {"dir": str(tmp_path)}
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "proxy.cli", "usage", "-c", str(path), *args],
                              capture_output=True, text=True, timeout=60)

    out = run("--by", "model,route", "--format", "json")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["model"] == "sluice-demo" and row["route"] == "main" and row["requests"] == 2
    out = run("--by", "day", "--format", "csv", "--since", "1d")
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("day,requests,")
    out = run("--by", "model")
    assert out.returncode == 0 and "sluice-demo" in out.stdout and "requests" in out.stdout.splitlines()[0]
    out = run("--by", "secret")
    assert out.returncode == 2 and "cannot group by 'secret'" in out.stderr
    (tmp_path / "ledger.db").write_bytes(b"this is not a database file" * 100)
    out = run("--by", "model")
    assert out.returncode == 1 and "cannot read the ledger: file is not a database" in out.stderr
    assert "Traceback" not in out.stderr


async def test_sluice_usage_reads_a_ledger_whose_directory_name_holds_uri_characters(upstream: FakeUpstream, tmp_path: Path):
    """The ledger was opened as ``file:{path}?mode=ro``: a state.dir holding "?" or "#" named another file
    (SQLite read the rest as the URI's query or fragment) and "%" sequences were decoded."""
    import subprocess
    import sys

    import yaml

    state = tmp_path / "state?v=1#a %41"
    cfg = config(upstream)
    cfg["state"] = {"dir": str(state)}
    async with SluiceServer(cfg, tmp_path) as s:
        async with client(s) as c:
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
        await s.wait_idle()
    assert (state / "ledger.db").exists()
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "usage", "-c", str(path), "--by", "model", "--format", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["model"] == "sluice-demo" and row["requests"] == 1


def test_utc_day_matches_strftime_across_day_boundaries():
    import datetime as dt

    from plugins.metering import utc_day

    for ts in (0.0, 86399.999, 86400.0, 1.7e9, 1763942399.9999, 1763942400.0, 4102444800.0):
        assert utc_day(ts) == dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d"), ts
