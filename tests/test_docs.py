"""The generated reference docs match the code, and the code is documented enough to generate them."""

from __future__ import annotations

import importlib.util
import json
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from proxy.config import SluiceConfig, load_config
from proxy.errors import ConfigError
from proxy.hookspecs import REQUEST_HOOKS, hook_reference
from proxy.registry import plugin_registry

ROOT = Path(__file__).resolve().parents[1]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _gen_docs()
RENDERED = gen_docs.render()


@pytest.mark.parametrize("path", sorted(RENDERED), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_file_is_current(path: Path) -> None:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run python scripts/gen_docs.py"
    current = path.read_text()
    if current != RENDERED[path]:
        import difflib

        diff = "".join(
            list(difflib.unified_diff(current.splitlines(True), RENDERED[path].splitlines(True), "committed", "generated"))[:40]
        )
        pytest.fail(f"{path.relative_to(ROOT)} is out of date: run python scripts/gen_docs.py and commit it\n{diff}")


def test_check_mode_reports_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(gen_docs, "DOCS", tmp_path)
    monkeypatch.setattr(gen_docs, "ROOT", tmp_path.parent)
    orig_render = gen_docs.render

    def render_into_tmp() -> dict[Path, str]:
        return {tmp_path / p.name: text for p, text in orig_render().items()}

    monkeypatch.setattr(gen_docs, "render", render_into_tmp)
    assert gen_docs.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert gen_docs.main([]) == 0
    assert gen_docs.main(["--check"]) == 0
    (tmp_path / "hooks.md").write_text("stale\n")
    assert gen_docs.main(["--check"]) == 1


def test_every_hook_is_documented_in_the_reference() -> None:
    hooks_md = RENDERED[gen_docs.DOCS / "hooks.md"]
    names = [h["name"] for h in hook_reference()]
    assert set(REQUEST_HOOKS) <= set(names)
    for hook in hook_reference():
        assert hook["doc"].strip(), f"hook {hook['name']} has no docstring"
        assert f"### `{hook['name']}`" in hooks_md
        assert hook["signature"] in hooks_md


def _models(model: type[BaseModel], seen: set[type[BaseModel]] | None = None):
    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    yield model
    for field in model.model_fields.values():
        for sub in gen_docs._model_in(field.annotation):
            yield from _models(sub, seen)


def _all_models():
    yield from ((f"core:{m.__name__}", m) for m in _models(SluiceConfig))
    for name, cls in sorted(plugin_registry().items()):
        yield from ((f"{name}:{m.__name__}", m) for m in _models(cls.Config))


def _numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation) if a is not type(None))


# Any integer is a valid random seed: a bound would only be arbitrary.
UNBOUNDED_BY_NATURE = frozenset({"seed"})


@pytest.mark.parametrize("label,model", list(_all_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_config_field_has_a_description_and_numbers_have_bounds(label: str, model: type[BaseModel]) -> None:
    missing = [n for n, f in model.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"{label}: fields without a description: {missing}"
    unbounded = [
        n for n, f in model.model_fields.items()
        if _numeric(f.annotation) and typing.get_origin(f.annotation) not in (list, dict) and not gen_docs.bounds(f)
        and n not in UNBOUNDED_BY_NATURE
    ]
    assert not unbounded, f"{label}: numeric fields without bounds: {unbounded}"


def test_every_plugin_has_a_section() -> None:
    ref = RENDERED[gen_docs.DOCS / "config-reference.md"]
    for name in plugin_registry():
        assert f"### `{name}`" in ref


# -- the JSON Schema accepts what the loader accepts, and rejects what it rejects ----

SCHEMA = json.loads(RENDERED[gen_docs.DOCS / "config.schema.json"])


def _validator():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


def _config_files() -> list[Path]:
    files = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.yml"))
    default = ROOT / "proxy" / "default.yaml"
    return ([default] if default.exists() else []) + files


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate_against_the_schema(path: Path) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    assert not errors, f"{path.name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_schema_agrees_with_the_loader() -> None:
    v = _validator()
    plugin = sorted(plugin_registry())[0] if plugin_registry() else None
    good = {
        "server": {"port": 8080, "drain_seconds": 10},
        "admin": {"token": {"$env": "SLUICE_ADMIN_TOKEN", "default": "t"}},
        "upstreams": {"vllm": {"url": "http://127.0.0.1:8000/v1", "kind": "vllm", "api_key": {"$env": "K", "default": "x"}}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "vllm", "chain": [{plugin: {}}] if plugin else []}],
    }
    assert not list(v.iter_errors(good))
    load_config(data=good)  # the loader agrees

    bad_cases = [
        {"server": {"port": 70000}},
        {"server": {"nope": 1}},
        {"upstreams": {"u": {"url": "http://x", "kind": "tgi"}}},
        {"routes": [{"chain": [{"no-such-plugin": {}}]}]},
    ]
    if plugin:
        bad_cases.append({"routes": [{"chain": [{plugin: {"no_such_field": 1}}]}]})
    for bad in bad_cases:
        assert list(v.iter_errors(bad)), f"schema accepted {bad}"
        with pytest.raises(ConfigError):
            load_config(data=bad)
