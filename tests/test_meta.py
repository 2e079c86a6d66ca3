"""Meta-tests: the contract is documented and tested, every config in configs/ serves, plugins are complete."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import BaseModel

from proxy import hookspecs
from proxy.config import SluiceConfig
from proxy.registry import plugin_registry
from proxy.testing import FakeUpstream, SluiceServer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_hook_is_documented_and_exercised_by_the_conformance_tests():
    conformance = (ROOT / "tests" / "test_conformance.py").read_text()
    for ref in hookspecs.hook_reference():
        assert len(ref["doc"]) > 80, f"{ref['name']} needs a real docstring"
        if ref["name"] in hookspecs.REQUEST_HOOKS:
            assert f"def {ref['name']}(" in conformance, f"{ref['name']} has no conformance test"


def _fields_documented(model: type[BaseModel], where: str) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(f"{where}.{name}")
        ann = field.annotation
        for sub in getattr(ann, "__args__", ()) or (ann,):
            if inspect.isclass(sub) and issubclass(sub, BaseModel) and sub is not model:
                missing += _fields_documented(sub, f"{where}.{name}")
    return missing


def test_every_config_field_has_a_description():
    missing = _fields_documented(SluiceConfig, "config")
    for name, cls in plugin_registry().items():
        missing += _fields_documented(cls.Config, f"plugin {name}")
    assert missing == []


def test_every_builtin_plugin_has_docs_and_tests():
    import plugins

    for cls in plugins.builtin_classes():
        assert (ROOT / "docs" / "plugins" / f"{cls.name}.md").exists(), f"docs/plugins/{cls.name}.md missing"
        assert list((ROOT / "tests" / "plugins").glob(f"test_{cls.name}*.py")), f"tests/plugins/test_{cls.name}*.py missing"
        assert cls.__doc__, f"{cls.__name__} needs a docstring"


def _env_names(node: Any) -> set[str]:
    if isinstance(node, dict):
        if "$env" in node:
            return {node["$env"]}
        return set().union(*(_env_names(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_env_names(v) for v in node)) if node else set()
    return set()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
async def test_every_config_file_loads_and_serves(path, tmp_path, monkeypatch, request):
    data = yaml.safe_load(path.read_text()) or {}
    for name in _env_names(data):
        monkeypatch.setenv(name, "test-value-" + name.lower())
    async with FakeUpstream() as up:
        for u in (data.get("upstreams") or {}).values():
            u["url"] = up.url
        state = data.setdefault("state", {})
        state["dir"] = str(tmp_path / "state")
        if "redis" in state:
            rs = request.getfixturevalue("redis_server")
            state["redis"]["url"] = rs.url
        data.setdefault("server", {}).update({"port": 0, "workers": 1})
        data.setdefault("admin", {})["port"] = 0
        async with SluiceServer(data, tmp_path) as s, httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{s.url}/chat/completions", json={"model": "sluice-demo", "messages": [{"role": "user", "content": "hello"}]})
            assert r.headers["x-request-id"].startswith("req_")
            assert r.status_code < 500, r.text
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_configs_exist_for_each_use_case():
    assert (ROOT / "configs" / "default.yaml").exists()
    assert len(CONFIGS) >= 2


def test_no_bare_create_task_in_product_code():
    offenders = []
    for path in list((ROOT / "proxy").rglob("*.py")) + list((ROOT / "plugins").rglob("*.py")):
        if path.name == "runtime.py" and path.parent.name == "proxy":
            continue  # the one place that creates them
        text = path.read_text()
        for m in re.finditer(r"(?<!loop)\.create_task\(|asyncio\.ensure_future\(", text):
            offenders.append(f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}")
    assert offenders == [], "use runtime.spawn(...) (named, referenced tasks)"


def _shipped_chains() -> list[tuple[str, list[dict]]]:
    """Every chain of a config the project ships: configs/, and the deploy examples (compose, docker, the
    Kubernetes ConfigMaps)."""
    out = []
    texts = [(p.name, p.read_text()) for p in CONFIGS]
    deploy = ROOT / "contrib" / "deploy"
    texts += [(str(p.relative_to(ROOT)), p.read_text()) for p in (deploy / "compose" / "sluice.yaml", deploy / "docker" / "sluice.yaml")]
    for p in sorted((deploy / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                texts += [(f"{p.name}:{k}", v) for k, v in (doc.get("data") or {}).items() if k.endswith((".yaml", ".yml"))]
    for name, text in texts:
        data = yaml.safe_load(text) or {}
        out += [(f"{name} route {i}", r.get("chain") or []) for i, r in enumerate(data.get("routes") or [])]
    return out


def test_shipped_chains_put_each_plugin_after_those_it_reads():
    """``Plugin.follows`` (class level): loading any of these would warn otherwise."""
    registry = plugin_registry()
    chains = _shipped_chains()
    assert len(chains) >= 10
    for where, chain in chains:
        names = [next(iter(entry)) for entry in chain]
        for i, name in enumerate(names):
            for other in registry[name].follows:
                assert other not in names[i + 1:], f"{where}: {name} comes before {other}"
