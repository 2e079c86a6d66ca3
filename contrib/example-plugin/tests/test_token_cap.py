"""The example plugin, installed as a package, found through its entry point and driven end to end."""

from __future__ import annotations

import openai
import pytest
from pydantic import ValidationError

from proxy import ProxyError
from proxy.registry import plugin_registry
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context
from sluice_token_cap import TokenCap


def test_registered_through_entry_point():
    assert plugin_registry(refresh=True)["token_cap"] is TokenCap


def test_config_rejects_default_above_cap():
    with pytest.raises(ValidationError, match="default_max_tokens must not exceed max_tokens"):
        TokenCap.Config.model_validate({"max_tokens": 10, "default_max_tokens": 20})


async def test_clamps_and_defaults():
    plugin = await configure_plugin(TokenCap, {"max_tokens": 50, "default_max_tokens": 20})
    ctx = make_context({"model": "m", "messages": [], "max_tokens": 500})
    plugin.on_request(ctx)
    assert ctx.body["max_tokens"] == 50 and ctx.body_changed
    ctx = make_context({"model": "m", "messages": []})
    plugin.on_request(ctx)
    assert ctx.body["max_completion_tokens"] == 20
    ctx = make_context({"model": "m", "messages": [], "max_tokens": 5})
    plugin.on_request(ctx)
    assert not ctx.body_changed


async def test_reject_mode():
    plugin = await configure_plugin(TokenCap, {"max_tokens": 50, "action": "reject"})
    with pytest.raises(ProxyError) as e:
        plugin.on_request(make_context({"model": "m", "prompt": "x", "max_tokens": 51}))
    assert e.value.status == 400 and e.value.param == "max_tokens"


async def test_leaves_answered_requests_alone():
    plugin = await configure_plugin(TokenCap, {"max_tokens": 1, "action": "reject"})
    ctx = make_context({"model": "m", "messages": [], "max_tokens": 99})
    ctx.reply(200, {"ok": True})
    plugin.on_request(ctx)
    assert ctx.body["max_tokens"] == 99


async def test_end_to_end(tmp_path):
    async with FakeUpstream() as up:
        cfg = {
            "upstreams": {"u": {"url": up.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"token_cap": {"max_tokens": 3}}]}],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b c d e"}], max_tokens=100)
            assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
            assert up.requests[-1].json["max_tokens"] == 3
