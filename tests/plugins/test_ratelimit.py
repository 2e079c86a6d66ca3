"""ratelimit: config validation, admission and reconciliation, and a real server with the openai SDK."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from plugins.ratelimit import RESERVATION, RateLimit, RateLimitConfig, format_duration
from proxy import Attempt, Identity, ProxyError, Response, Target, Usage
from proxy.state.memory import MemoryCounters
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context, make_runtime

CHAT = {"model": "sluice-demo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20}
KEY = Identity(key_id="k1", team="blue")


# -- config ------------------------------------------------------------------

@pytest.mark.parametrize(
    "conf, message",
    [
        ({"identity_limits": False}, "Value error, no limit is configured and identity_limits is off: this plugin would never limit anything"),
        ({"team": {}}, "Value error, team: give at least one of requests_per_minute, tokens_per_minute, concurrency"),
        ({"requests_per_minute": 0}, "Input should be greater than or equal to 1"),
        ({"backend": "sqlite"}, "Input should be 'auto', 'memory' or 'redis'"),
        ({"global": {"rpm": 5}}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(conf, message):
    with pytest.raises(ValidationError) as err:
        RateLimitConfig.model_validate(conf)
    assert message in [e["msg"] for e in err.value.errors()]


def test_config_global_alias_and_defaults():
    c = RateLimitConfig.model_validate({"global": {"requests_per_minute": 5}})
    assert c.global_.requests_per_minute == 5
    assert c.backend == "auto" and c.default_max_tokens == 1024 and c.anonymous == "client_ip"


@pytest.mark.parametrize("s, text", [(0.0201, "21ms"), (0.0, "0ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3723, "1h2m3s"), (59.9999, "1m0s")])
def test_reset_durations_look_like_openai(s, text):
    assert format_duration(s) == text


# -- the hook ------------------------------------------------------------------

@pytest.fixture
async def runtime(tmp_path):
    rt = await make_runtime(tmp_path)
    yield rt
    await rt.close_all()


async def call(hook: Any, *args: Any) -> Any:
    """Run a hook as the chain does: on the memory backend ratelimit's hooks are plain functions."""
    r = hook(*args)
    return await r if inspect.isawaitable(r) else r


def _ctx(runtime, body=CHAT, identity=KEY, **kw):
    return make_context(body, identity=identity, runtime=runtime, **kw)


async def _refused(plugin, ctx) -> ProxyError:
    with pytest.raises(ProxyError) as err:
        await call(plugin.on_request, ctx)
    return err.value


async def test_requests_per_minute_burst_then_429_with_headers(runtime):
    rl = await configure_plugin(RateLimit, {"requests_per_minute": 3}, runtime=runtime)
    for i in range(3):
        ctx = _ctx(runtime)
        await call(rl.on_request, ctx)
        assert ctx.response_headers["x-ratelimit-limit-requests"] == "3"
        assert ctx.response_headers["x-ratelimit-remaining-requests"] == str(2 - i)
    err = await _refused(rl, _ctx(runtime))
    assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert err.message.startswith("Rate limit reached for requests per minute on this key (limit 3). Please try again in ")
    assert err.headers["retry-after"] == "20" and 19_000 < int(err.headers["retry-after-ms"]) <= 20_000
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    # another key has its own bucket
    await call(rl.on_request, _ctx(runtime, identity=Identity(key_id="k2")))


async def test_tokens_are_reserved_and_all_limits_are_all_or_nothing(runtime):
    rl = await configure_plugin(RateLimit, {"tokens_per_minute": 1000, "team": {"requests_per_minute": 2}}, runtime=runtime)
    ctx = _ctx(runtime)
    await call(rl.on_request, ctx)
    res = ctx.stash[RESERVATION]
    assert res.tokens == res.prompt_tokens + 20 and res.prompt_tokens > 0
    assert int(ctx.response_headers["x-ratelimit-remaining-tokens"]) == 1000 - res.tokens
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "1"  # the team's: the tightest
    await call(rl.on_request, _ctx(runtime, identity=Identity(key_id="k2", team="blue")))
    err = await _refused(rl, _ctx(runtime, identity=Identity(key_id="k3", team="blue")))
    assert "on this team (limit 2)" in err.message
    # k3 was refused by its team: its own token bucket was not touched
    ctx = _ctx(runtime, identity=Identity(key_id="k3"))
    await call(rl.on_request, ctx)
    assert int(ctx.response_headers["x-ratelimit-remaining-tokens"]) == 1000 - res.tokens


async def test_a_request_larger_than_the_token_limit_is_refused_outright(runtime):
    rl = await configure_plugin(RateLimit, {"tokens_per_minute": 100}, runtime=runtime)
    err = await _refused(rl, _ctx(runtime, body={**CHAT, "max_tokens": 500}))
    assert err.status == 429 and err.reason == "request_too_large"
    assert err.message.startswith("Request too large: it needs about ")


@pytest.mark.parametrize("asks", [{"max_tokens": "500"}, {"max_tokens": 500.0}, {"max_completion_tokens": " 500 "},
                                  {"max_tokens": 5, "n": "100"}, {"max_tokens": 5, "n": 100.0}])
async def test_counts_given_as_floats_or_strings_are_reserved_as_the_upstream_reads_them(runtime, asks):
    """vLLM's pydantic models take ``"500"`` and ``500.0`` as 500 (and ``n`` likewise): read as ints only,
    they reserved the default and the request passed a limit it breaks."""
    rl = await configure_plugin(RateLimit, {"tokens_per_minute": 100, "default_max_tokens": 10}, runtime=runtime)
    err = await _refused(rl, _ctx(runtime, body={**CHAT, **asks}))
    assert err.status == 429 and err.reason == "request_too_large"


async def test_identity_limits_override_the_config_and_teams_and_models_apply(runtime):
    rl = await configure_plugin(RateLimit, {
        "requests_per_minute": 100, "teams": {"red": {"requests_per_minute": 1}},
        "models": {"big-*": {"requests_per_minute": 1}},
    }, runtime=runtime)
    own = Identity(key_id="vip", limits={"requests_per_minute": 1})
    await call(rl.on_request, _ctx(runtime, identity=own))
    assert (await _refused(rl, _ctx(runtime, identity=own))).status == 429
    await call(rl.on_request, _ctx(runtime, identity=Identity(key_id="a", team="red")))
    assert "team" in (await _refused(rl, _ctx(runtime, identity=Identity(key_id="b", team="red")))).message
    await call(rl.on_request, _ctx(runtime, body={**CHAT, "model": "big-1"}))
    assert "model" in (await _refused(rl, _ctx(runtime, body={**CHAT, "model": "big-1"}, identity=Identity(key_id="z")))).message
    await call(rl.on_request, _ctx(runtime, body={**CHAT, "model": "small"}, identity=Identity(key_id="z")))


async def test_an_azure_deployment_in_the_path_is_the_model_limited(runtime):
    """Per-model limits read the body's model only: a client naming a small model in the body reached the big
    deployment Azure runs, under the small model's limits."""
    rl = await configure_plugin(RateLimit, {"models": {"big-*": {"requests_per_minute": 1}}}, runtime=runtime)
    path = "/openai/deployments/big-1/chat/completions"
    await call(rl.on_request, _ctx(runtime, body={**CHAT, "model": "small"}, path=path))
    err = await _refused(rl, _ctx(runtime, body={**CHAT, "model": "small"}, path=path, identity=Identity(key_id="z")))
    assert err.status == 429 and "model" in err.message
    await call(rl.on_request, _ctx(runtime, body={**CHAT, "model": "big-1"}, path="/openai/deployments/small/chat/completions"))


async def test_anonymous_requests_are_limited_by_client_address(runtime):
    rl = await configure_plugin(RateLimit, {"requests_per_minute": 1}, runtime=runtime)
    await call(rl.on_request, _ctx(runtime, identity=None, client_ip="10.0.0.1"))
    assert (await _refused(rl, _ctx(runtime, identity=None, client_ip="10.0.0.1"))).status == 429
    await call(rl.on_request, _ctx(runtime, identity=None, client_ip="10.0.0.2"))


async def test_concurrency_slots_are_released_in_on_done(runtime):
    rl = await configure_plugin(RateLimit, {"concurrency": 1}, runtime=runtime)
    first = _ctx(runtime)
    await call(rl.on_request, first)
    err = await _refused(rl, _ctx(runtime))
    assert (err.status, err.reason) == (429, "concurrency_limited")
    await call(rl.on_done, first)
    await call(rl.on_done, first)  # idempotent
    await call(rl.on_request, _ctx(runtime))


def _finished(ctx, usage: Usage | None, status: int = 200, stream_events: int = 0) -> None:
    ctx.attempts.append(Attempt(Target("up"), start=0.0, status=status))
    ctx.status = status
    ctx.usage = usage
    ctx.stream_events = stream_events


async def _remaining_tokens(rl, runtime) -> int:
    probe = _ctx(runtime, body={"model": "sluice-demo", "prompt": "", "max_tokens": 0})
    await call(rl.on_request, probe)
    return int(probe.response_headers["x-ratelimit-remaining-tokens"])


@pytest.mark.parametrize(
    "usage, status, events, expected",
    [
        (Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8), 200, 0, "used"),  # the real usage
        (None, 500, 0, "nothing"),  # an upstream error: nothing generated
        (None, None, 0, "nothing"),  # never reached an upstream (a later plugin answered)
        (None, 200, 7, "stream"),  # a stream cut short: prompt plus one token per content event
        (None, 200, 0, "prompt"),  # a stream cut before its first event: its prompt (the reservation stood)
        ("response", 200, 0, "response"),  # an answer without usage: prompt plus its text, estimated
        (Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), 200, 7, "stream"),  # all-zero usage: none, estimated
        ("cancelled", None, 0, "prompt"),  # the upstream had it, the client left first: its prompt (charged 0)
        ("timeout", None, 0, "prompt"),  # the upstream had it and missed first_byte: its prompt (charged 0)
        ("unsent", None, 0, "nothing"),  # cancelled before it was sent: nothing
    ],
)
async def test_reconcile_with_the_real_usage(runtime, usage, status, events, expected):
    rl = await configure_plugin(RateLimit, {"tokens_per_minute": 100_000}, runtime=runtime)
    rl.counters = MemoryCounters(clock=lambda: 1_800_000_000.0)  # time stands still: no refill blurs the figures
    ctx = _ctx(runtime)
    await call(rl.on_request, ctx)
    res = ctx.stash[RESERVATION]
    if usage in ("cancelled", "timeout", "unsent"):  # an attempt that got no answer, as the core records it
        ctx.attempts.append(Attempt(Target("up"), start=0.0, error="cancelled" if usage == "unsent" else usage,
                                    unsent=usage == "unsent"))
        ctx.usage = None
    elif status is None:
        ctx.usage = None
    elif usage == "response":
        _finished(ctx, None, status, events)
        ctx.response = Response(200, {}, b'{"choices": [{"message": {"content": "abcdefghijkl"}}]}')
    else:
        _finished(ctx, usage, status, events)
    await call(rl.on_done, ctx)
    # the cut stream: 7 events less the role's (no finish event came) are 6 tokens
    used = {"used": 8, "nothing": 0, "stream": res.prompt_tokens + 6, "prompt": res.prompt_tokens, "response": res.prompt_tokens + 3}[expected]
    # no refill: the bucket shows exactly what was charged
    assert await _remaining_tokens(rl, runtime) == 100_000 - used


async def test_a_stream_past_its_reservation_is_charged_after_the_fact(runtime):
    rl = await configure_plugin(RateLimit, {"tokens_per_minute": 1000, "default_max_tokens": 10}, runtime=runtime)
    rl.counters = MemoryCounters(clock=lambda: 1_800_000_000.0)
    ctx = _ctx(runtime, body={k: v for k, v in CHAT.items() if k != "max_tokens"})
    await call(rl.on_request, ctx)
    _finished(ctx, Usage(prompt_tokens=5, completion_tokens=1195, total_tokens=1200))
    await call(rl.on_done, ctx)  # 1200 used of 1000: the bucket is in debt
    err = await _refused(rl, _ctx(runtime, body={**CHAT, "max_tokens": 1}))
    assert err.status == 429 and int(err.headers["retry-after"]) >= 12


async def test_an_answered_request_is_left_alone(runtime):
    rl = await configure_plugin(RateLimit, {"requests_per_minute": 1}, runtime=runtime)
    ctx = _ctx(runtime)
    ctx.reply(401, {"error": "no"})
    await call(rl.on_request, ctx)
    assert RESERVATION not in ctx.stash and not ctx.response_headers
    await call(rl.on_done, ctx)
    await call(rl.on_request, _ctx(runtime))  # the slot is still there


# -- through a server ----------------------------------------------------------

def _config(up: FakeUpstream, **rl) -> dict:
    return {
        "upstreams": {"up": {"url": up.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "up", "chain": [
            {"auth": {"keys": [{"key": "sk-test-aaaaaaaaaaaaaaaa", "id": "a"}, {"key": "sk-test-bbbbbbbbbbbbbbbb", "id": "b",
                                                                             "limits": {"requests_per_minute": 1}}]}},
            {"ratelimit": rl},
        ]}],
    }


async def test_openai_sdk_sees_headers_and_429(tmp_path):
    async with FakeUpstream() as up, SluiceServer(_config(up, requests_per_minute=2, tokens_per_minute=10_000), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test-aaaaaaaaaaaaaaaa", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(**CHAT)
            h = raw.headers
            assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "1"
            assert h["x-ratelimit-limit-tokens"] == "10000" and int(h["x-ratelimit-remaining-tokens"]) < 10_000
            assert h["x-ratelimit-reset-requests"] == "30s"
            raw.parse()
            await client.chat.completions.create(**CHAT)
            with pytest.raises(openai.RateLimitError) as err:
                await client.chat.completions.create(**CHAT)
            r = err.value.response
            assert r.headers["retry-after"] and r.headers["x-ratelimit-remaining-requests"] == "0"
            assert err.value.body["code"] == "rate_limit_exceeded" and err.value.body["type"] == "rate_limit_error"
            assert len(up.requests) == 2
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test-bbbbbbbbbbbbbbbb", max_retries=0) as other:
            await other.chat.completions.create(**CHAT)  # its own bucket, from its key record: 1 per minute
            with pytest.raises(openai.RateLimitError):
                await other.chat.completions.create(**CHAT)
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(s.admin_url + "/metrics") as r:
            text = await r.text()
        assert 'sluice_ratelimit_decisions_total{limit="requests",result="limited",scope="key"} 2.0' in text
        assert 'sluice_ratelimit_decisions_total{limit="",result="allowed",scope=""} 3.0' in text
        assert "sk-test" not in text and "k:a" not in text and "k:b" not in text


# Refill is 1/60 of the limit per second: the bounds below allow for it, and the limits are kept
# small enough that refill during a test cannot hide a reservation that was not given back.
async def test_streams_are_reconciled_with_the_usage_the_core_obtained(tmp_path):
    async with FakeUpstream() as up, SluiceServer(_config(up, tokens_per_minute=3000), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test-aaaaaaaaaaaaaaaa", max_retries=0) as client:
            stream = await client.chat.completions.create(**{**CHAT, "max_tokens": 500}, stream=True)
            chunks = [c async for c in stream]
            assert chunks and all(c.usage is None for c in chunks)  # the usage chunk the client did not ask for is hidden
            await s.wait_idle()
            used = up.stats.prompt_tokens + up.stats.generation_tokens
            raw = await client.completions.with_raw_response.create(model="sluice-demo", prompt="", max_tokens=0)
            # what was taken is what the stream really used, not the 500 reserved
            left = int(raw.headers["x-ratelimit-remaining-tokens"])
            assert used > 0 and 3000 - used - 5 <= left


async def test_a_client_gone_mid_stream_is_reconciled(tmp_path):
    async with FakeUpstream(token_delay=0.02) as up, SluiceServer(_config(up, tokens_per_minute=3000, concurrency=1), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test-aaaaaaaaaaaaaaaa", max_retries=0) as client:
            stream = await client.chat.completions.create(**{**CHAT, "max_tokens": 400}, stream=True)
            async for _ in stream:
                break
            await stream.close()
            await s.wait_idle()
            # the concurrency slot came back and no 400-token reservation lingers
            raw = await client.completions.with_raw_response.create(model="sluice-demo", prompt="", max_tokens=0)
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 3000 - 100


async def test_upstream_errors_give_the_tokens_back(tmp_path):
    async with FakeUpstream() as up, SluiceServer(_config(up, tokens_per_minute=3000), tmp_path) as s:
        up.fail_next(500)
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test-aaaaaaaaaaaaaaaa", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(**{**CHAT, "max_tokens": 2000})
            await s.wait_idle()
            raw = await client.completions.with_raw_response.create(model="sluice-demo", prompt="", max_tokens=0)
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 3000 - 5


async def test_limits_survive_a_reload(tmp_path):
    async with FakeUpstream() as up, SluiceServer(_config(up, requests_per_minute=2), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test-aaaaaaaaaaaaaaaa", max_retries=0) as client:
            await client.chat.completions.create(**CHAT)
            await client.chat.completions.create(**CHAT)
            ok, why = await s.reload(_config(up, requests_per_minute=2, tokens_per_minute=50_000))
            assert ok, why
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(**CHAT)


async def test_concurrent_clients_never_exceed_the_limit(tmp_path):
    async with FakeUpstream() as up, SluiceServer(_config(up, requests_per_minute=25), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test-aaaaaaaaaaaaaaaa", max_retries=0) as client:
            async def one() -> bool:
                try:
                    await client.chat.completions.create(**CHAT)
                    return True
                except openai.RateLimitError:
                    return False

            loop = asyncio.get_running_loop()
            t0 = loop.time()
            results = await asyncio.gather(*[one() for _ in range(60)])
            elapsed = loop.time() - t0
        assert 25 <= sum(results) <= 25 + int(elapsed * 25 / 60)


async def test_a_configured_tokenizer_counts_the_prompt(runtime, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "there": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rl = await configure_plugin(RateLimit, {"tokens_per_minute": 10_000, "tokenizers": {"sluice-*": str(tmp_path / "tokenizer.json")}},
                                runtime=runtime)
    body = {**CHAT, "messages": [{"role": "user", "content": "hello there " * 50}]}
    ctx = _ctx(runtime, body=body)
    await call(rl.on_request, ctx)
    assert ctx.stash[RESERVATION].prompt_tokens == 3 + 100 + 3  # exact: 100 words, not 600 bytes / 4
    other = _ctx(runtime, body={**body, "model": "gpt-4o"}, identity=Identity(key_id="k9"))
    await call(rl.on_request, other)
    assert other.stash[RESERVATION].prompt_tokens == 3 + 150 + 3  # no tokenizer for it: the estimate


async def test_a_big_prompt_is_tokenized_in_the_executor(runtime, tmp_path):
    """Over 32 KiB a configured tokenizer counts the prompt in the runtime's thread pool (watched here), not
    on the event loop; a small prompt is counted on the spot."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.plugins.test_metering_audit import WatchedPool

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "there": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rl = await configure_plugin(RateLimit, {"tokens_per_minute": 100_000, "tokenizers": {"sluice-*": str(tmp_path / "tokenizer.json")}},
                                runtime=runtime)
    pool = WatchedPool.install(runtime)
    small = _ctx(runtime, body={**CHAT, "messages": [{"role": "user", "content": "hello there " * 50}]})
    await call(rl.on_request, small)
    assert pool.ran == [] and small.stash[RESERVATION].prompt_tokens == 3 + 100 + 3
    big = _ctx(runtime, body={**CHAT, "messages": [{"role": "user", "content": "hello there " * 4000}]})  # 48,000 bytes
    await call(rl.on_request, big)
    assert pool.ran == ["count_prompt_tokens"] and big.stash[RESERVATION].prompt_tokens == 3 + 8000 + 3


async def test_a_missing_tokenizer_fails_at_start(runtime, tmp_path):
    with pytest.raises(Exception):
        await configure_plugin(RateLimit, {"tokens_per_minute": 10, "tokenizers": {"x": str(tmp_path / "missing.json")}}, runtime=runtime)


async def test_memory_hooks_are_plain_functions_and_redis_ones_coroutines(runtime, redis_server):
    """On memory nothing waits, so the chain calls plain functions (no coroutine per request); on
    Redis admission waits, and on_done waits only when settlements are sent at once."""
    mem = await configure_plugin(RateLimit, {"requests_per_minute": 5, "concurrency": 2}, runtime=runtime)
    assert not inspect.iscoroutinefunction(mem.on_request) and not inspect.iscoroutinefunction(mem.on_done)
    rt = await make_runtime(config={"state": {"redis": {"url": redis_server.url, "timeout_ms": 2000}}})
    try:
        red = await configure_plugin(RateLimit, {"requests_per_minute": 5}, runtime=rt)
        assert inspect.iscoroutinefunction(red.on_request) and not inspect.iscoroutinefunction(red.on_done)
        at_once = await configure_plugin(RateLimit, {"requests_per_minute": 5, "settle_delay_ms": 0}, runtime=rt)
        assert inspect.iscoroutinefunction(at_once.on_done)
    finally:
        await rt.close_all()
    # the plain path gives the same answers: headers, reservation, slots
    first = _ctx(runtime)
    mem.on_request(first)
    assert first.response_headers["x-ratelimit-remaining-requests"] == "4"
    assert first.response_headers["x-ratelimit-reset-requests"] == "12s"
    mem.on_request(_ctx(runtime))
    err = await _refused(mem, _ctx(runtime))
    assert err.reason == "concurrency_limited"
    mem.on_done(first)
    ctx = _ctx(runtime)
    mem.on_request(ctx)
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "2"


async def test_decision_counts_are_exposed(runtime):
    from prometheus_client import generate_latest

    rl = await configure_plugin(RateLimit, {"requests_per_minute": 1, "tokens_per_minute": 100}, runtime=runtime)
    await call(rl.on_request, _ctx(runtime))
    await _refused(rl, _ctx(runtime))
    await _refused(rl, _ctx(runtime, body={**CHAT, "max_tokens": 500}, identity=Identity(key_id="big")))
    text = generate_latest(runtime.metrics).decode()
    assert 'sluice_ratelimit_decisions_total{limit="",result="allowed",scope=""} 1.0' in text
    assert 'sluice_ratelimit_decisions_total{limit="requests",result="limited",scope="key"} 1.0' in text
    assert 'sluice_ratelimit_decisions_total{limit="tokens",result="limited",scope="key"} 1.0' in text
    assert "sluice_ratelimit_overrun_tokens_total 0.0" in text


async def test_requests_per_minute_alone_needs_no_on_done(runtime):
    """Nothing to reconcile or free: no on_done (no background work per request) and no usage asked for."""
    from proxy.registry import hook_functions

    rpm_only = await configure_plugin(RateLimit, {"requests_per_minute": 5, "global": {"requests_per_minute": 50},
                                                  "identity_limits": False}, runtime=runtime)
    assert "on_done" not in hook_functions(rpm_only) and not rpm_only.needs_usage
    await call(rpm_only.on_request, _ctx(runtime))
    for conf in ({"requests_per_minute": 5}, {"requests_per_minute": 5, "identity_limits": False, "team": {"concurrency": 2}},
                 {"identity_limits": False, "models": {"x*": {"tokens_per_minute": 10}}}):
        plugin = await configure_plugin(RateLimit, conf, runtime=runtime)
        assert "on_done" in hook_functions(plugin) and plugin.needs_usage, conf
