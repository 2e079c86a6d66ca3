"""Plugin discovery: entry points (built-ins and packages) and $SLUICE_PLUGINS modules."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

import plugins
from proxy.registry import plugin_registry, register_plugin
from proxy import Plugin, hookimpl
from proxy.testing import SluiceProcess

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"


def test_builtins_arrive_through_the_entry_point_like_any_package():
    reg = plugin_registry(refresh=True)
    for cls in plugins.builtin_classes():
        assert reg[cls.name] is cls
    assert "token_cap" in reg  # contrib/example-plugin, installed as its own package


def test_hooks_must_be_marked():
    class Sloppy(Plugin):
        name = "sloppy"

        def on_request(self, ctx):  # no @hookimpl
            return None

    with pytest.raises(TypeError, match=r"Sloppy.on_request is not marked @hookimpl"):
        register_plugin(Sloppy)


def test_misspelt_hook_argument_fails_at_chain_build():
    from proxy.registry import hook_functions
    from proxy.testing import make_context  # noqa: F401

    class Wrong(Plugin):
        name = "wrong"

        @hookimpl
        def on_request(self, context):  # the spec's argument is ctx
            return None

    with pytest.raises(Exception, match="context"):
        hook_functions(Wrong(Wrong.Config(), None))  # type: ignore[arg-type]


def test_a_misspelt_hook_or_argument_is_refused_when_the_class_is_registered():
    """A guard whose hook was misspelt (on_requests) passed `sluice check` and `serve` and never ran, letting
    every request through; a wrong argument name passed `check` and crashed `serve`. Both are refused where
    the class is registered, which `sluice check` does too."""

    class Typo(Plugin):
        name = "typo"

        @hookimpl
        def on_requests(self, ctx):
            return None

    with pytest.raises(TypeError, match=r"Typo.on_requests is marked @hookimpl but no hook is named 'on_requests'"):
        register_plugin(Typo)

    class Arg(Plugin):
        name = "arg"

        @hookimpl
        def on_chunk(self, ctx, evt):
            return None

    with pytest.raises(TypeError, match=r"Arg.on_chunk takes evt: on_chunk passes only ctx, event"):
        register_plugin(Arg)


def test_a_broken_plugin_package_is_one_line_from_sluice_check(tmp_path):
    import subprocess
    import sys

    (tmp_path / "broken_pkg.py").write_text(
        "from proxy import Plugin, hookimpl\n"
        "class Gate(Plugin):\n    name = 'gate'\n    @hookimpl\n    def on_requests(self, ctx):\n        return None\n"
        "@hookimpl\ndef register_plugins(register):\n    register(Gate)\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("routes: [{match: {path: /v1/}, chain: [{gate: {}}]}]\n")
    env = {**os.environ, "SLUICE_PLUGINS": "broken_pkg", "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(cfg)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "sluice: plugins could not be loaded: TypeError: Gate.on_requests is marked @hookimpl but no hook is named "
        "'on_requests' (hooks: on_request, on_response, on_chunk, on_stream_end, on_done)")


@pytest.mark.slow
async def test_sluice_plugins_env_loads_a_module_in_the_serving_process(upstream, tmp_path):
    env = {"SLUICE_PLUGINS": "sluice_env_plugin", "PYTHONPATH": f"{FIXTURES}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cfg = {"upstreams": {"u": {"url": upstream.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"env_tag": {}}]}]}
    async with SluiceProcess(cfg, tmp_path, env=env) as p, httpx.AsyncClient() as http:
        r = await http.get(f"{p.url}/models")
    assert r.headers["x-env-plugin"] == "yes"
