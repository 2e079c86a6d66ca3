"""Config loading: validation messages (verbatim), secrets, env overrides, plugin configs, `sluice check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from proxy import Plugin, PluginConfig, hookimpl
from proxy.config import DEFAULT_CONFIG, load_config
from proxy.errors import ConfigError
from proxy.testing import register_plugin

ROOT = Path(__file__).resolve().parents[1]


class Knob(Plugin):
    name = "knob"

    class Config(PluginConfig):
        level: int = Field(1, ge=1, le=5, description="how much")

    @hookimpl
    def on_request(self, ctx):
        return None


@pytest.fixture(autouse=True)
def knob():
    with register_plugin(Knob):
        yield


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "sluice.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {"upstreams": {"u": {"url": "http://127.0.0.1:8000/v1"}}}
ROUTER = {"aliases": {"fast": {"targets": [{"upstream": "u", "model": "m-small"}]}}}


def test_defaults_load():
    loaded = load_config(None, environ={})
    assert loaded.source == str(DEFAULT_CONFIG)
    assert loaded.config.routes[0].match.path == "/v1/"


def test_default_and_full_chain_order_is_pinned():
    default = load_config(None, environ={})
    assert [list(e)[0] for e in default.config.routes[0].chain] == ["metering", "metrics"]
    full = yaml.safe_load((ROOT / "configs" / "full.yaml").read_text())
    assert [list(e)[0] for e in full["routes"][0]["chain"]] == [
        "auth", "ratelimit", "injection", "pii", "cache", "experiments", "router", "metering", "tracing", "metrics", "drift",
    ]


def test_embedded_defaults_match_configs_default():
    assert (ROOT / "configs" / "default.yaml").read_text() == DEFAULT_CONFIG.read_text()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"server": {"port": 70000}}, "server.port: Input should be less than or equal to 65535"),
        ({"server": {"prot": 1}}, "server.prot: unknown field"),
        ({**BASE, "routes": [{"upstream": "nope"}]}, "routes[0].upstream: unknown upstream 'nope' (known: u)"),
        ({**BASE, "routes": [{"upstream": "u", "chain": [{"nope": {}}]}]}, "routes[0].chain[0]: unknown plugin 'nope'"),
        ({**BASE, "routes": [{"upstream": "u", "chain": [{"knob": {"level": 9}}]}]},
         "routes[0].chain[0].knob.level: Input should be less than or equal to 5 (plugin knob)"),
        ({**BASE, "routes": [{"upstream": "u", "chain": [{"knob": {"levle": 2}}]}]},
         "routes[0].chain[0].knob.levle: unknown field (plugin knob)"),
        ({**BASE, "routes": [{"upstream": "u", "chain": [{"knob": {}}, {"knob": {}}]}]},
         "routes[0].chain[1].knob: plugin 'knob' appears twice in this chain; give each an 'id' (plugin knob)"),
        ({"upstreams": {"u": {"url": "ftp://x"}}}, "upstreams.u.url: Value error, must start with http:// or https://"),
        # the top-level price table was never checked at load: sluice check passed, serve died in a traceback
        ({"prices": {"my-model": {"input": "abc", "output": 1}}}, "prices: Value error, my-model: input: Input should be a valid number"),
        ({"prices": {"m": 5}}, "prices: Value error, m: expected a mapping with input, cached_input, output"),
        # no upstream and no demo model: every request answered 502 while /readyz said ready
        ({"server": {"demo_upstream": False}, "routes": [{"match": {"path": "/v1/"}}]},
         "routes[0].upstream: no upstream to send to: configure 'upstreams' (or turn server.demo_upstream on)"),
        ({"prices": {"m": {"input": 1, "colour": 2}}}, "prices: Value error, m: colour: unknown field"),
    ],
)
def test_errors_name_file_path_and_plugin(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_same_plugin_twice_with_ids(tmp_path):
    path = write(tmp_path, {**BASE, "routes": [{"upstream": "u", "chain": [{"knob": {"id": "a"}}, {"knob": {"id": "b", "level": 3}}]}]})
    loaded = load_config(path, environ={})
    assert [c.level for _, c in loaded.chains[0]] == [1, 3]


def test_env_secrets(tmp_path, monkeypatch):
    data = {"upstreams": {"u": {"url": "http://h/v1", "api_key": {"$env": "SLUICE_TEST_KEY"}}}}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"upstreams.u.api_key: environment variable SLUICE_TEST_KEY is not set"):
        load_config(path, environ={})
    monkeypatch.setenv("SLUICE_TEST_KEY", "sk-1")
    assert load_config(path, environ={}).config.upstreams["u"].api_key == "sk-1"


@pytest.mark.parametrize("ref,message", [
    ({"$env": 5}, r"admin.token: \$env must name an environment variable \(a string\), not 5"),
    ({"$env": ""}, r"admin.token: \$env must name an environment variable"),
    ({"$env": "X", "dflt": "y"}, r"admin.token: an \$env reference takes only 'default' besides '\$env', not dflt"),
])
def test_a_malformed_env_reference_is_a_config_error(tmp_path, ref, message):
    """Named where it is, never a Python error from deep in the loader."""
    path = write(tmp_path, {**BASE, "admin": {"token": ref}})
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_env_overrides(tmp_path):
    path = write(tmp_path, BASE)
    loaded = load_config(path, environ={"SLUICE__SERVER__PORT": "8123", "SLUICE__UPSTREAMS__U__TIMEOUTS__IDLE": "7.5"})
    assert loaded.config.server.port == 8123
    assert loaded.config.upstreams["u"].timeouts.idle == 7.5


def test_an_env_override_reaches_a_name_with_hyphens_or_capitals(tmp_path):
    """A variable's name has no "-": SLUICE__UPSTREAMS__LOCAL_VLLM__URL made a second upstream local_vllm that no
    route used, and traffic kept going to local-vllm's URL from the file."""
    data = {"upstreams": {"local-vllm": {"url": "http://127.0.0.1:8000/v1"}, "GPU-2": {"url": "http://127.0.0.1:8001/v1"}},
            "routes": [{"upstream": ["local-vllm", "GPU-2"]}]}
    path = write(tmp_path, data)
    loaded = load_config(path, environ={"SLUICE__UPSTREAMS__LOCAL_VLLM__URL": "http://10.0.0.9:8000/v1",
                                        "SLUICE__UPSTREAMS__GPU_2__TIMEOUTS__IDLE": "9"})
    ups = loaded.config.upstreams
    assert set(ups) == {"local-vllm", "GPU-2"}
    assert ups["local-vllm"].url == "http://10.0.0.9:8000/v1" and ups["GPU-2"].timeouts.idle == 9
    # two keys a variable could name (and neither is its own spelling): refused, not guessed
    both = write(tmp_path, {"upstreams": {"a-b": {"url": "http://h/v1"}, "A-B": {"url": "http://i/v1"}}})
    with pytest.raises(ConfigError, match="SLUICE__UPSTREAMS__A_B__URL: 'a_b' could name any of A-B, a-b"):
        load_config(both, environ={"SLUICE__UPSTREAMS__A_B__URL": "http://j/v1"})


def test_an_env_value_that_is_not_yaml_is_taken_as_written(tmp_path):
    # YAML's error quoted the value (an admin token) in a traceback
    path = write(tmp_path, BASE)
    for secret in ("*Sup3rS3cret", "%Sup3rS3cret", "[1,2", "{a"):
        assert load_config(path, environ={"SLUICE__ADMIN__TOKEN": secret}).config.admin.token == secret
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SLUICE__SERVER__PORT": "*Sup3rS3cret"})
    assert r.returncode == 1 and "server.port" in r.stderr
    assert "Sup3rS3cret" not in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"server: {port: 4750}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 26\)"):
        load_config(p, environ={})


def test_a_yaml_alias_that_holds_itself_is_a_config_error(tmp_path):
    """prices: &x [*x] is valid YAML, a list that holds itself: the load recursed until a RecursionError."""
    p = tmp_path / "loop.yaml"
    p.write_text("prices: &x [*x]\n")
    with pytest.raises(ConfigError, match=r"loop.yaml: prices\[0\]: a YAML alias refers to a node that holds it"):
        load_config(p, environ={})
    shared = tmp_path / "shared.yaml"  # the same node twice is no loop
    shared.write_text("prices: {a: &p {input: 1, output: 2}, b: *p}\n")
    assert load_config(shared, environ={}).config.prices["b"] == {"input": 1, "output": 2}


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("server: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(p, environ={})


def test_a_key_given_twice_is_refused(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text("server:\n  port: 8080\n  port: 9090\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: line 3 invalid YAML: duplicate key 'port'"):
        load_config(p, environ={})
    p.write_text("base: &b {port: 8080, host: 127.0.0.1}\nserver:\n  <<: *b\n  port: 9090\n")  # a merge is not a repeat
    with pytest.raises(ConfigError, match="base"):  # the unknown top-level key, not a duplicate
        load_config(p, environ={})


@pytest.mark.parametrize("first,second", [
    ({}, {}),
    ({}, {"methods": ["GET"]}),  # every method first: the GET route is never reached
    ({"methods": ["get", "POST"]}, {"methods": ["POST"]}),
    ({"headers": {"X-Team": "a"}}, {"headers": {"x-team": "a", "x-env": "b"}}),  # names compare without case
])
def test_a_route_no_request_can_reach_is_refused(tmp_path, first, second):
    routes = [{"match": {"path": "/v1/", **first}, "upstream": "u"}, {"name": "b", "match": {"path": "/v1/", **second}, "upstream": "u"}]
    with pytest.raises(ConfigError, match=r"routes\[1\].match: routes\[0\] \(the same path prefix, earlier in the file\) takes every"):
        load_config(write(tmp_path, {**BASE, "routes": routes}), environ={})
    if first != second:  # the narrower route first, both are reached
        assert len(load_config(write(tmp_path, {**BASE, "routes": routes[::-1]}), environ={}).config.routes) == 2


def test_routes_that_each_take_some_requests_are_fine(tmp_path):
    routes = [{"match": {"path": "/v1/", "methods": ["GET"]}, "upstream": "u"},
              {"match": {"path": "/v1/", "headers": {"x-team": "a"}}, "upstream": "u"},
              {"match": {"path": "/v1/"}, "upstream": "u"},
              {"match": {"path": "/v1/chat/"}, "upstream": "u"}]
    assert len(load_config(write(tmp_path, {**BASE, "routes": routes}), environ={}).config.routes) == 4


@pytest.mark.parametrize("entry, message", [
    ({"router": {"aliases": {"chat": {"targets": [{"upstream": "nope"}]}}}},
     "routes[0].chain[0].router.aliases.chat.targets: unknown upstream(s) nope: add them to 'upstreams' (plugin router)"),
    ({"experiments": {"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a", "weight": 1, "upstream": "nope"}, {"name": "b", "weight": 1}]}]}},
     "routes[0].chain[0].experiments.experiments[0].variants: unknown upstream(s) nope: add them to 'upstreams' (plugin experiments)"),
    ({"experiments": {"shadows": [{"name": "s", "target": {"upstream": "nope"}}]}},
     "routes[0].chain[0].experiments.shadows[0].target.upstream: unknown upstream nope: add it to 'upstreams' (plugin experiments)"),
    ({"metering": {"tokenizers": {"m-*": "/nonexistent/tokenizer.json"}}},
     "routes[0].chain[0].metering.tokenizers.m-*: cannot read /nonexistent/tokenizer.json: no such readable file (plugin metering)"),
    ({"cache": {"backend": "redis"}}, "routes[0].chain[0].cache.backend: 'redis' needs state.redis in the config (plugin cache)"),
    ({"ratelimit": {"backend": "redis", "requests_per_minute": 5}},
     "routes[0].chain[0].ratelimit.backend: 'redis' needs state.redis in the config (plugin ratelimit)"),
    ({"auth": {"store": "redis"}}, "routes[0].chain[0].auth.store: 'redis' needs state.redis in the config (plugin auth)"),
    ({"auth": {"failure_backend": "redis"}},
     "routes[0].chain[0].auth.failure_backend: 'redis' needs state.redis in the config (plugin auth)"),
    ({"metering": {"budget_backend": "redis"}},
     "routes[0].chain[0].metering.budget_backend: 'redis' needs state.redis in the config (plugin metering)"),
], ids=["router", "experiment", "shadow", "tokenizer", "cache-redis", "ratelimit-redis", "auth-store-redis", "auth-failures-redis",
        "budgets-redis"])
def test_sluice_check_refuses_what_the_server_would_refuse_at_start(tmp_path, entry, message):
    # these were checked only when the plugin started: `sluice check` said ok, `sluice serve` refused
    path = write(tmp_path, {**BASE, "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [entry]}]})
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout
    assert r.stderr.strip() == f"sluice: {path}: {message}"


def test_sluice_check_cli(tmp_path):
    good = write(tmp_path, BASE)
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok (0 routes, 1 upstreams" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"server": {"workers": 0}}))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"sluice: {bad}: server.workers: Input should be greater than or equal to 1"
    # -c FILE, as the other commands that read the config take it
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "-c", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "server.workers" in r.stderr
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "-c", str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok (0 routes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(good), "-c", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "one config file" in r.stderr


def test_version_cli():
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().startswith("sluice ")


@pytest.mark.parametrize(("chain", "warned"), [
    ([{"metrics": {}}, {"metering": {}}], ["metrics comes before metering"]),
    ([{"metering": {}}, {"metrics": {}}], []),
    ([{"tracing": {"exporter": "none"}}, {"metering": {}}], []),  # propagation only: reads nothing
    ([{"tracing": {"exporter": "console", "capture_content": True}}, {"pii": {}}, {"metering": {}}],
     ["tracing comes before pii", "tracing comes before metering"]),
    ([{"pii": {}}, {"metering": {}}, {"tracing": {"exporter": "console", "capture_content": True}}, {"drift": {}}], []),
    ([{"metering": {}}, {"router": ROUTER}], ["metering comes before router"]),
    ([{"router": ROUTER}, {"metering": {}}], []),
])
async def test_a_plugin_placed_before_one_it_reads_is_warned_of(tmp_path, caplog, chain, warned):
    from proxy.testing import SluiceServer

    caplog.set_level("WARNING", logger="sluice.chain")
    async with SluiceServer({**BASE, "routes": [{"name": "r", "upstream": "u", "chain": chain}]}, tmp_path):
        pass
    said = [r.getMessage() for r in caplog.records if r.name == "sluice.chain"]
    assert len(said) == len(warned) and all(any(w in m for m in said) for w in warned), said
