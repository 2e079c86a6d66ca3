"""Experiments through a real server: A/B splits, shadows, canaries, the admin API and the CLI."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
import yaml

from plugins.experiments import Experiments
from proxy import Context, Plugin, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context, make_runtime, register_plugin

ROOT = Path(__file__).resolve().parents[2]
MSG = [{"role": "user", "content": "tell me a story"}]


@contextlib.asynccontextmanager
async def two() -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    async with FakeUpstream() as a, FakeUpstream() as b:
        yield a, b


def config(a: FakeUpstream, b: FakeUpstream, **experiments: Any) -> dict:
    return {
        "upstreams": {"a": {"url": a.url}, "b": {"url": b.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "chain": [{"experiments": experiments}]}],
    }


AB = {"name": "prompt-v2", "model": "sluice-demo", "variants": [{"name": "control"}, {"name": "candidate", "upstream": "b", "model": "cand"}]}


def client(s: SluiceServer, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.url, api_key=key, max_retries=0)


def chats(up: FakeUpstream) -> list[dict]:
    return [r.json for r in up.requests if r.path.endswith("/chat/completions")]


async def ask(c: openai.AsyncOpenAI, **kw: Any):
    return await c.chat.completions.create(model=kw.pop("model", "sluice-demo"), messages=kw.pop("messages", MSG), **kw)


async def rows(s: SluiceServer, sql: str, params: tuple = ()) -> list[dict]:
    await s.wait_idle()
    await s.runtime.tasks.wait(10)
    return await s.runtime.state.records("experiments").query(sql, params)


async def test_ab_split_is_sticky_per_key_and_recorded(tmp_path: Path):
    async with two() as (a, b):
        async with SluiceServer(config(a, b, experiments=[AB]), tmp_path) as s:
            seen: dict[str, set[str]] = {}
            for k in range(16):
                async with client(s, f"sk-{k}") as c:
                    for _ in range(2):
                        r = await ask(c)
                        seen.setdefault(f"sk-{k}", set()).add(r.model)
            results = await rows(s, "SELECT variant, ok, upstream, model FROM experiment_results")
        assert all(len(v) == 1 for v in seen.values()), "one key, one variant"
        models = {m for v in seen.values() for m in v}
        assert models == {"sluice-demo", "cand"}, "both variants got traffic"
        assert len(results) == 32 and all(r["ok"] == 1 for r in results)
        assert {(r["variant"], r["upstream"]) for r in results} == {("control", "a"), ("candidate", "b")}
        assert all(q["model"] == "cand" for q in chats(b))


async def test_sticky_by_header_and_by_user(tmp_path: Path):
    exp_h = {**AB, "sticky": "header", "header": "x-session"}
    async with two() as (a, b):
        async with SluiceServer(config(a, b, experiments=[exp_h]), tmp_path) as s, client(s) as c:
            for session in ("s1", "s2", "s3", "s4", "s5", "s6"):
                got = {(await ask(c, extra_headers={"x-session": session})).model for _ in range(3)}
                assert len(got) == 1
    exp_u = {**AB, "sticky": "user"}
    async with two() as (a, b):
        async with SluiceServer(config(a, b, experiments=[exp_u]), tmp_path / "u") as s, client(s) as c:
            for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
                got = {(await ask(c, user=user)).model for _ in range(3)}
                assert len(got) == 1


async def test_sticky_key_without_auth_tells_azure_clients_apart(tmp_path: Path):
    """Without auth, only Authorization was hashed: clients sending api-key (Azure's SDK) all fell back to the
    client IP, and behind a load balancer landed in one variant."""
    import hashlib

    rt = await make_runtime(tmp_path)
    try:
        plugin = await configure_plugin(Experiments, {"experiments": [AB]}, runtime=rt)
        exp = plugin.config.experiments[0]

        def unit(headers: dict[str, str]) -> str | None:
            return plugin._unit(make_context({"model": "sluice-demo", "messages": MSG}, runtime=rt, headers=headers), exp)

        a, b = unit({"api-key": "key-a"}), unit({"api-key": "key-b"})
        assert a != b and a.startswith("c:") and unit({"x-api-key": "key-a"}) == a
        # a client with Authorization keeps the unit it had (its assignment does not move on upgrade)
        assert unit({"authorization": "Bearer k"}) == "c:" + hashlib.sha256(b"Bearer k").hexdigest()
        await plugin.stop()
    finally:
        await rt.close_all()


async def test_variant_is_tagged_on_the_context(tmp_path: Path):
    async with two() as (a, b):
        rt = await make_runtime(tmp_path, config={"upstreams": {"a": {"url": a.url}, "b": {"url": b.url}}})
        try:
            plugin = await configure_plugin(Experiments, {"experiments": [{**AB, "sticky": "random",
                                                                            "variants": [{"name": "control", "weight": 0}, {"name": "candidate", "upstream": "b", "model": "cand"}]}]}, runtime=rt)
            ctx = make_context({"model": "sluice-demo", "messages": MSG}, runtime=rt)
            plugin.on_request(ctx)
            assert ctx.tags == {"experiment": "prompt-v2", "variant": "candidate"}
            assert [(t.upstream, t.model, t.label) for t in ctx.targets] == [("b", "cand", "prompt-v2/candidate")]
            # a request answered before us is left alone
            early = make_context({"model": "sluice-demo", "messages": MSG}, runtime=rt)
            early.reply(401, {"error": {"message": "no"}})
            plugin.on_request(early)
            assert early.tags == {} and early.targets == []
            await plugin.stop()
        finally:
            await rt.close_all()


async def test_shadow_is_compared_and_never_slows_or_breaks_the_client(tmp_path: Path):
    async with two() as (a, b):
        b.first_byte_delay = 2.0
        shadow = {"name": "cand", "target": {"upstream": "b", "model": "cand-model"}, "sample": 1.0, "max_concurrency": 8}
        async with SluiceServer(config(a, b, shadows=[shadow]), tmp_path) as s, client(s) as c:
            t0 = time.perf_counter()
            r = await ask(c)
            chunks = [ch async for ch in await ask(c, stream=True, messages=[{"role": "user", "content": "stream please"}])]
            elapsed = time.perf_counter() - t0
            assert elapsed < 1.5, "the client did not wait for the slow shadow"
            assert r.model == "sluice-demo" and chunks[-1].choices[0].finish_reason == "stop"
            b.first_byte_delay = 0.0
            b.fail_next(500)
            r2 = await ask(c, messages=[{"role": "user", "content": "shadow fails"}])
            assert r2.choices[0].message.content
            comps = await rows(s, "SELECT * FROM shadow_comparisons ORDER BY ts")
        assert len(comps) == 3
        slow = max(comps, key=lambda x: x["shadow_latency_ms"])
        assert slow["shadow_latency_ms"] >= 2000 and slow["primary_latency_ms"] < 1500
        failed = next(x for x in comps if x["shadow_status"] == 500)
        ok = [x for x in comps if x["shadow_status"] == 200]
        assert len(ok) == 2
        for x in ok:
            # the demo model echoes the prompt: the same answer from both, whatever the model name
            assert x["exact_match"] == 1 and x["similarity"] == 1.0
            assert x["primary_finish_reason"] == x["shadow_finish_reason"] == "stop"
            assert x["primary_completion_tokens"] == x["shadow_completion_tokens"] > 0
            assert x["shadow_model"] == "cand-model" and x["primary_upstream"] == "a"
        assert failed["exact_match"] is None and failed["primary_status"] == 200
        # what the shadow received: a buffered request with the candidate's model; the streamed request's
        # copy says stream: false, the buffered ones' (sent without the field) get none added
        sent = chats(b)
        assert all(q["model"] == "cand-model" and "stream_options" not in q for q in sent)
        assert sorted(str(q.get("stream", "absent")) for q in sent) == ["False", "absent", "absent"]


class Bouncer(Plugin):
    """A guard after the experiments plugin: refuses requests carrying x-block."""

    name = "bouncer"
    kind = "guard"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        if ctx.headers.get("x-block"):
            ctx.reply(403, {"error": {"message": "blocked by policy", "type": "permission_error", "param": None, "code": "blocked"}})


async def test_a_request_refused_later_in_the_chain_is_not_mirrored(tmp_path: Path):
    async with two() as (a, b):
        cfg = config(a, b, shadows=[{"name": "m", "target": {"upstream": "b"}, "sample": 1.0}])
        cfg["routes"][0]["chain"].append({"bouncer": {}})
        with register_plugin(Bouncer):
            async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
                with pytest.raises(openai.PermissionDeniedError):
                    await ask(c, extra_headers={"x-block": "1"})
                await ask(c)
                comps = await rows(s, "SELECT request_id FROM shadow_comparisons")
        assert len(comps) == 1 and len(chats(b)) == 1 and len(chats(a)) == 1


async def test_shadow_drops_and_counts_when_full(tmp_path: Path):
    async with two() as (a, b):
        b.first_byte_delay = 0.5
        shadow = {"name": "busy", "target": {"upstream": "b"}, "sample": 1.0, "max_concurrency": 1}
        async with SluiceServer(config(a, b, shadows=[shadow]), tmp_path) as s, client(s) as c:
            for _ in range(3):
                await ask(c)
            plugin = next(p for r in s.server.generation.routes for p in r.plugins if isinstance(p, Experiments))
            assert plugin.metrics.shadow.labels("busy", "dropped")._value.get() == 2
            assert plugin.metrics.shadow.labels("busy", "sent")._value.get() == 1
            comps = await rows(s, "SELECT shadow FROM shadow_comparisons")
        assert len(comps) == 1 and len(chats(a)) == 3


CANARY = {"name": "rollout", "model": "sluice-demo", "sticky": "random",
          "variants": [{"name": "stable"}, {"name": "next", "upstream": "b"}],
          "canary": {"stable": "stable", "canary": "next", "steps": [50, 100], "min_requests": 8, "min_step_seconds": 0,
                     "max_error_rate_delta": 0.05, "alpha": 0.05, "window": 100}}


async def admin(s: SluiceServer, method: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
        async with http.request(method, s.admin_url + path) as resp:
            return resp.status, await resp.json()


async def test_canary_rolls_back_on_errors_and_says_so(tmp_path: Path):
    async with two() as (a, b):
        b.fail_next(500, count=1000)
        async with SluiceServer(config(a, b, experiments=[CANARY], check_every=4), tmp_path) as s, client(s) as c:
            for _ in range(60):
                with contextlib.suppress(openai.InternalServerError):
                    await ask(c)
                await s.wait_idle()
            status, body = await admin(s, "GET", "/admin/experiments/rollout")
            before_b = len(chats(b))
            for _ in range(10):
                await ask(c)
            assert len(chats(b)) == before_b, "after the rollback the canary gets nothing"
            events = await rows(s, "SELECT event, share, reason FROM experiment_events WHERE experiment = 'rollout' ORDER BY ts")
        assert status == 200
        (exp,) = body["experiments"]
        assert exp["canary"]["status"] == "rolled_back" and exp["canary"]["share"] == 0
        by = {v["variant"]: v for v in exp["variants"]}
        assert by["next"]["error_rate"] == 1.0 and by["stable"]["error_rate"] == 0.0
        assert exp["comparisons"][0]["error_rate"]["p_value"] < 0.001
        assert [e["event"] for e in events] == ["start", "rollback"]
        assert "error rate" in events[-1]["reason"]


async def test_canary_steps_to_completion_and_resumes_after_restart(tmp_path: Path):
    async with two() as (a, b):
        cfg = config(a, b, experiments=[CANARY], check_every=4)
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            for _ in range(80):
                await ask(c)
                await s.wait_idle()
            status, body = await admin(s, "GET", "/admin/experiments")
            assert body["experiments"][0]["canary"]["status"] == "completed"
            n = len(chats(b))
            for _ in range(5):
                await ask(c)
            assert len(chats(b)) == n + 5, "a completed canary takes all traffic"
            # an operator rolls it back by hand
            status, desc = await admin(s, "POST", "/admin/experiments/rollout/rollback")
            assert status == 200 and desc["share"] == 0
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            n = len(chats(b))
            for _ in range(5):
                await ask(c)
            assert len(chats(b)) == n, "a restart resumes the rolled-back state"
            status, body = await admin(s, "GET", "/admin/experiments/nope")
            assert status == 404 and body["error"]["code"] == "not_found"
            events = await rows(s, "SELECT event FROM experiment_events ORDER BY ts")
        assert [e["event"] for e in events] == ["start", "step", "completed", "rollback"]


async def test_cli_reports_statistics(tmp_path: Path):
    async with two() as (a, b):
        cfg = config(a, b, experiments=[AB], shadows=[{"name": "mirror", "target": {"upstream": "b"}, "sample": 1.0}])
        async with SluiceServer(cfg, tmp_path) as s:
            for k in range(12):
                async with client(s, f"sk-{k}") as c:
                    await ask(c)
            await rows(s, "SELECT 1")
        cfg["state"] = {"dir": str(tmp_path)}
        path = tmp_path / "sluice.yaml"
        path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "experiments", "-c", str(path)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "experiment prompt-v2" in out.stdout and "candidate vs control" in out.stdout
    assert "shadow mirror" in out.stdout and "12 compared" in out.stdout
    js = subprocess.run([sys.executable, "-m", "proxy.cli", "experiments", "-c", str(path), "--json", "prompt-v2"],
                        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert js.returncode == 0, js.stderr
    import json

    (rep,) = json.loads(js.stdout)
    assert sum(v["requests"] for v in rep["experiments"][0]["variants"]) == 12
    assert rep["shadows"] == []
    typo = subprocess.run([sys.executable, "-m", "proxy.cli", "experiments", "-c", str(path), "prompt-v3"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert typo.returncode == 1 and "no experiment or shadow named 'prompt-v3'" in typo.stderr
    assert "known: mirror, prompt-v2" in typo.stderr


async def test_variant_reaches_the_ledger(tmp_path: Path):
    import sqlite3

    async with two() as (a, b):
        cfg = config(a, b, experiments=[AB])
        cfg["routes"][0]["chain"].append({"metering": {}})
        async with SluiceServer(cfg, tmp_path) as s:
            for k in range(6):
                async with client(s, f"sk-{k}") as c:
                    await ask(c)
            results = await rows(s, "SELECT request_id, variant FROM experiment_results")
            await s.runtime.state.records("ledger").flush()
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        ledger = dict(conn.execute("SELECT id, variant FROM ledger").fetchall())
    finally:
        conn.close()
    assert ledger == {r["request_id"]: r["variant"] for r in results} and len(ledger) == 6


async def test_reload_keeps_a_rollout_unless_its_definition_changed(tmp_path: Path):
    async with two() as (a, b):
        cfg = config(a, b, experiments=[CANARY])
        async with SluiceServer(cfg, tmp_path) as s:
            status, desc = await admin(s, "POST", "/admin/experiments/rollout/promote")
            assert status == 200 and desc["share"] == 100
            ok, why = await s.reload(cfg)
            assert ok, why
            _, body = await admin(s, "GET", "/admin/experiments")
            assert [e["canary"]["share"] for e in body["experiments"]] == [100]
            changed = config(a, b, experiments=[{**CANARY, "canary": {**CANARY["canary"], "steps": [10, 100]}}])
            ok, why = await s.reload(changed)
            assert ok, why
            _, body = await admin(s, "GET", "/admin/experiments/rollout")
            assert body["experiments"][0]["canary"]["share"] == 10
            events = await rows(s, "SELECT event FROM experiment_events ORDER BY ts")
        assert [e["event"] for e in events] == ["start", "promote", "start"]
