"""The YAML config file as pydantic models, ``{"$env": NAME}`` secrets, plugin loading.

Everything is validated at load; errors name the file, the path in it and the plugin.
Settings can also come from the environment: ``SLUICE__SERVER__PORT=8080`` sets
``server.port`` (each ``__`` descends one level; values are parsed as YAML).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .plugin import Plugin, PluginConfig
from .prices import parse_table

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
ENV_PREFIX = "SLUICE__"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Model):
    host: str = Field("127.0.0.1", description="Address the proxy listens on.")
    port: int = Field(4000, ge=0, le=65535, description="Port for client traffic (0 picks a free port).")
    workers: int = Field(1, ge=1, le=64, description="Processes serving the port (SO_REUSEPORT); state is shared through SQLite or Redis.")
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024,
        description="Largest request body accepted; larger bodies get 413. A route may lower or raise it: OpenAI's Files API "
        "takes uploads up to 512 MB (batch input files up to 200 MB), so a route for /v1/files and /v1/uploads that "
        "must pass them raises it there (a body is held in memory while it is checked and sent)."
    )
    body_timeout_s: float = Field(
        60.0, ge=0, le=3600,
        description="How long a client may pause while sending a request body (no new bytes): a body that stalls longer "
        "gets 408 request_timeout and its connection is closed, so a slow or stuck sender cannot hold a handler. "
        "A body that arrives with its headers is read with no timer. 0 turns the limit off.",
    )
    drain_seconds: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, how long in-flight requests and streams may take to finish before exit."
    )
    background_queue: int = Field(
        10000, ge=10, le=1_000_000, description="Bound of the queue of on_done work; when full, work is dropped and counted."
    )
    background_workers: int = Field(4, ge=1, le=256, description="Tasks draining the on_done queue concurrently.")
    done_batch_ms: float = Field(
        50.0, ge=0, le=1000,
        description="On routes whose on_done hooks are all plain functions, the observers' on_done (plugins of kind "
        "'observer': metrics, metering, tracing, drift) runs in batches, hook by hook: each hook for every request of "
        "the batch in arrival order, then the next hook, so a hook's code runs warm for several requests instead of cold "
        "after each. A batch runs when it holds 8 requests, or when a request "
        "finishes once the batch's first has waited this many milliseconds; when no request finishes, 4 times this "
        "after its first (a timer, which wakes an idle process, fires only then). Other plugins' on_done (a guard "
        "freeing a concurrency slot) runs at once, and so does the batch a request joins that must settle at once "
        "(ctx.settle_now: metering reconciling a budget's reservation). An admin read (metrics, reports) and a stop run "
        "what is waiting first. 0 runs every on_done right after its answer.")
    executor_threads: int = Field(2, ge=1, le=64, description="Threads of the bounded executor for CPU-heavy plugin work.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or CIDRs of proxies in front of Sluice whose X-Forwarded-For is believed; "
        "ctx.client_ip is then the nearest address not in this list.",
    )
    access_log: bool = Field(False, description="Log one line per request (request id, route, status, timings; never bodies or keys), "
                              "requests the core refused before any plugin ran included (outcome=refused).")
    memory_trim_s: float = Field(
        30.0, ge=0, le=3600,
        description="Every this many seconds, hand freed heap memory back to the system (glibc malloc_trim, off the loop), "
        "so a burst's high-water mark does not stay in RSS; 0 turns it off.",
    )
    demo_upstream: bool = Field(
        True, description="With no upstream configured, start the built-in demo model server in-process and route to it."
    )


    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return v


class AdminConfig(Model):
    enabled: bool = Field(True, description="Serve the admin API (keys, usage, reload, metrics) on its own listener.")
    host: str = Field("127.0.0.1", description="Address of the admin listener; keep it private.")
    port: int = Field(4001, ge=0, le=65535, description="Port of the admin listener (0 picks a free port).")
    token: str | None = Field(
        None, description='Bearer token for admin calls, usually {"$env": "SLUICE_ADMIN_TOKEN"}. Without one (or with an empty one), admin calls are refused.'
    )
    metrics_token: str | None = Field(None, description="If set (and not empty), /metrics on the admin listener needs this bearer token.")

    @field_validator("token", "metrics_token")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        # an empty variable behind {$env: ...} (an empty Secret, "${SLUICE_ADMIN_TOKEN:-}") is no token at all:
        # the admin API stays refused, never opened to a blank bearer
        return v if v is None or v.strip() else None


class RedisConfig(Model):
    url: str = Field(..., description="redis://, rediss:// or unix:// URL of a standalone Redis.")
    sentinel: list[str] | None = Field(None, description="host:port of Sentinels; with it, 'master_name' names the service.")
    master_name: str | None = Field(None, description="The Sentinel service name.")
    cluster: bool = Field(False, description="Connect to a Redis Cluster (keys of one limit share a hash tag).")
    timeout_ms: int = Field(50, ge=1, le=60000, description="Timeout of every Redis call.")
    breaker_failures: int = Field(5, ge=1, le=1000, description="Consecutive failures that open the breaker.")
    breaker_cooldown_s: float = Field(5.0, gt=0, le=3600, description="How long an open breaker stops calling Redis.")
    key_prefix: str = Field("sluice:", description="Prefix of every key Sluice writes.")

    @model_validator(mode="after")
    def _sentinel(self) -> RedisConfig:
        if self.sentinel and not self.master_name:
            raise ValueError("redis.sentinel needs redis.master_name")
        return self


class StateConfig(Model):
    dir: Path = Field(Path("./var"), description="Directory for SQLite files (ledger, keys, cache, samples).")
    redis: RedisConfig | None = Field(None, description="Share limits, budgets, keys and cache across replicas through Redis.")
    sqlite_timeout_ms: int = Field(2000, ge=1, le=600000, description="Timeout of every SQLite operation.")
    batch_size: int = Field(500, ge=1, le=100000, description="Rows per batched SQLite write.")
    flush_interval_ms: int = Field(
        1000, ge=1, le=60000,
        description="How long records wait before the writer takes them (sooner when batch_size rows wait). Each "
                    "wake-up of the writer commits once per table, and a commit has a cost of its own on top of its "
                    "rows: a longer wait means fewer, cheaper commits per row. SIGTERM and the admin API's reads (in "
                    "the worker that answers) write what waits first; `sluice usage`, reading the file from another "
                    "process, can be this far behind, and a crash of the process loses about this much (more if the "
                    "writer is behind).")


class Timeouts(Model):
    connect: float = Field(5.0, gt=0, le=600, description="Seconds to open a connection to the upstream.")
    first_byte: float = Field(
        600.0, gt=0, le=3600,
        description="Seconds from starting the request (connecting included) to the first byte of the answer. The OpenAI "
                    "SDKs wait 600 s for a read: a reasoning model can think for minutes before its first byte, and a "
                    "shorter value here fails (and the SDK retries) calls that work direct.")
    idle: float = Field(600.0, gt=0, le=3600, description="Longest silence between two reads of an answer (a stream's events; "
                        "a reasoning model's stream can be silent for minutes while it thinks).")
    total: float = Field(900.0, gt=0, le=86400, description="Longest one upstream attempt may take, stream included (raise it "
                         "for long generations; keep ratelimit's lease_ttl_s above it).")


class UpstreamConfig(Model):
    url: str = Field(..., description="Base URL; what follows a route's prefix is appended to it.")
    api_key: str | None = Field(None, description='The upstream\'s own key, usually {"$env": "OPENAI_API_KEY"}; replaces the client\'s credentials.')
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent with every request to this upstream.")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Connect, first byte, idle and total timeouts. First byte and total of a second or more fire up to 0.1 s late (they share timers).")
    max_connections: int = Field(256, ge=1, le=100000, description="Pooled keep-alive connections at most.")
    kind: Literal["openai", "vllm", "other"] = Field("openai", description="'vllm' enables vLLM-aware signals (/metrics polling).")
    models: list[str] = Field(default_factory=list, description="Models this upstream serves (informational; used by routing).")
    context_window: int | None = Field(None, ge=1, description="Tokens of context the upstream's model accepts, for fallbacks on long prompts.")
    health_path: str | None = Field(None, description="Path (after url's host) probed by /readyz; default: none, a TCP connect suffices.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class Match(Model):
    path: str = Field("/", description="Path prefix; what follows it is appended to the upstream URL.")
    methods: list[str] | None = Field(None, description="HTTP methods matched; default all.")
    headers: dict[str, str] = Field(default_factory=dict, description="Headers that must be present with these exact values.")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        return [m.upper() for m in v] if v else v


class Retries(Model):
    attempts: int = Field(0, ge=0, le=10, description="Extra attempts on one target before the next (0: none).")
    backoff_s: float = Field(0.2, ge=0, le=60, description="First backoff; doubles each time, with full jitter.")
    max_backoff_s: float = Field(5.0, ge=0, le=300, description="Longest single backoff.")
    on_status: list[int] = Field(default_factory=lambda: [429, 500, 502, 503, 504], description="Statuses that are retried or fall back.")
    deadline_s: float = Field(60.0, gt=0, le=3600, description="No new attempt starts this long after the request arrived.")


class RouteConfig(Model):
    name: str | None = Field(None, description="A label for metrics and logs; default: the path prefix.")
    match: Match = Field(default_factory=Match, description="Which requests this route takes.")
    upstream: str | list[str] | None = Field(
        None, description="Upstream name, or names in order of fallback. Omit only when the demo upstream is used."
    )
    chain: list[dict[str, Any]] = Field(default_factory=list, description="Plugins in order, each '- name: {config}'.")
    retries: Retries = Field(default_factory=Retries, description="Attempts before the first byte reaches the client.")
    max_body_bytes: int | None = Field(None, ge=1024, description="Overrides server.max_body_bytes for this route.")
    stream_usage: bool = Field(
        True, description="When a plugin needs a stream's usage, ask the upstream for it (stream_options.include_usage; "
        "the extra chunk is hidden from a client that did not ask). Off for upstreams that refuse the option: such streams "
        "are counted by estimate.")

    @property
    def upstream_names(self) -> list[str]:
        if self.upstream is None:
            return []
        return [self.upstream] if isinstance(self.upstream, str) else list(self.upstream)


class LoggingConfig(Model):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")
    format: Literal["text", "json"] = Field("text", description="Log line format.")


class SluiceConfig(Model):
    server: ServerConfig = Field(default_factory=ServerConfig, description="The client listener and process settings.")
    admin: AdminConfig = Field(default_factory=AdminConfig, description="The admin listener.")
    state: StateConfig = Field(default_factory=StateConfig, description="Where state lives: SQLite files, optionally Redis.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logs.")
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict, description="Upstreams by name.")
    routes: list[RouteConfig] = Field(default_factory=list, description="Routes, matched longest prefix first.")
    prices: dict[str, Any] = Field(
        default_factory=dict, description="Price table overrides, per model: input, cached_input, output per million tokens."
    )

    @field_validator("prices")
    @classmethod
    def _prices(cls, v: dict[str, Any]) -> dict[str, Any]:
        parse_table(v, "")  # checked here, where a bad one is a load error naming it; kept as written
        return v

    def upstream_names(self) -> set[str]:
        """The upstreams a plugin may name: those configured, else the built-in demo model's."""
        if not self.upstreams and self.server.demo_upstream:
            return {"demo"}
        return set(self.upstreams)

    @model_validator(mode="after")
    def _refs(self) -> SluiceConfig:
        for i, r in enumerate(self.routes):
            for name in r.upstream_names:
                if name not in self.upstreams:
                    known = ", ".join(sorted(self.upstreams)) or "none"
                    raise ValueError(f"routes[{i}].upstream: unknown upstream {name!r} (known: {known})")
            if not r.upstream_names and self.upstreams:
                raise ValueError(f"routes[{i}].upstream: required when upstreams are configured")
            if not self.upstreams and not self.server.demo_upstream:
                # it would answer every request 502 while /readyz said ready
                raise ValueError(f"routes[{i}].upstream: no upstream to send to: configure 'upstreams' "
                                 "(or turn server.demo_upstream on)")
        # routes are tried longest prefix first, ties in file order: a route is never reached when an earlier
        # one of the same prefix takes all its methods (or every method) and asks for no header it does not
        headers = [{k.lower(): v for k, v in r.match.headers.items()} for r in self.routes]
        for j, r in enumerate(self.routes):
            m = r.match
            for i in range(j):
                e = self.routes[i].match
                if e.path != m.path or not headers[i].items() <= headers[j].items():
                    continue
                if e.methods is None or (m.methods is not None and set(m.methods) <= set(e.methods)):
                    raise ValueError(f"routes[{j}].match: routes[{i}] (the same path prefix, earlier in the file) takes every "
                                     "request this route would: put the narrower route first, or give it another path, "
                                     "methods or headers")
        return self


# -- the file -----------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the safe loader keeps the last one
    silently: a setting written twice is a mistake to point at, not to guess)."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<" merges: keys given here win over merged ones, as YAML says
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        except TypeError:
            pass  # an unhashable key: the constructor below says so
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


# -- secrets and environment -------------------------------------------------

def resolve_env(node: Any, path: str = "", _open: frozenset[int] = frozenset()) -> Any:
    """Replace ``{"$env": NAME}`` (optionally with ``"default"``) by the variable's value."""
    if isinstance(node, (dict, list)):
        if id(node) in _open:  # YAML's anchors can make a node hold itself (x: &a [*a])
            raise ConfigError(f"{path or '<root>'}: a YAML alias refers to a node that holds it")
        _open = _open | {id(node)}
    if isinstance(node, dict):
        if "$env" in node:
            where = path or "<root>"
            extra = sorted(str(k) for k in node if k not in ("$env", "default"))
            if extra:
                raise ConfigError(f"{where}: an $env reference takes only 'default' besides '$env', not {', '.join(extra)}")
            name = node["$env"]
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}: $env must name an environment variable (a string), not {name!r}")
            if name in os.environ:
                return os.environ[name]
            if "default" in node:
                return node["default"]
            raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set")
        return {k: resolve_env(v, f"{path}.{k}" if path else str(k), _open) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_env(v, f"{path}[{i}]", _open) for i, v in enumerate(node)]
    return node


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or len(key) == len(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        node = data
        for p in parts[:-1]:
            p = _existing_key(node, p, key)
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        last = _existing_key(node, parts[-1], key)
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError:
            # not YAML ("*Sup3r", "%x", "[1,2"): the text itself. YAML's error would quote it,
            # and the value may be a secret
            node[last] = value
    return data


def _existing_key(node: dict[str, Any], part: str, variable: str) -> str:
    """The key of ``node`` an environment variable's ``part`` names: a variable's name has no ``-`` and is
    one case, so ``LOCAL_VLLM`` names an upstream ``local-vllm`` (or ``Local-VLLM``) the file has. A part
    that names none is a new key, as written (lower case)."""
    if part in node:
        return part
    found = [k for k in node if isinstance(k, str) and k.lower().replace("-", "_") == part]
    if len(found) > 1:
        raise ConfigError(f"{variable}: {part!r} could name any of {', '.join(sorted(found))}")
    return found[0] if found else part


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation(err: ValidationError, prefix: str = "", plugin: str | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = _loc(tuple(e["loc"]))
        where = ".".join(x for x in (prefix, loc) if x) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        tail = f" (plugin {plugin})" if plugin else ""
        lines.append(f"{where}: {msg}{tail}")
    return "; ".join(lines)


class LoadedConfig:
    """A validated config: the models plus each route's plugin classes and configs."""

    def __init__(self, config: SluiceConfig, chains: list[list[tuple[type[Plugin], PluginConfig]]], source: str) -> None:
        self.config = config
        self.chains = chains
        self.source = source


def read_raw(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], str]:
    if path is None:
        path = os.environ.get("SLUICE_CONFIG") or None
    if path is None:
        src = DEFAULT_CONFIG
    else:
        src = Path(path)
    try:
        text = Path(src).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{src}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}  # noqa: S506 - a SafeLoader that refuses duplicate keys
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{src}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping")
    return data, str(src)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
    registry: Mapping[str, type[Plugin]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Read, resolve and validate a whole config, plugin configs included."""
    from .registry import plugin_registry

    if data is None:
        data, source = read_raw(path)
    else:
        source = str(path or "<config>")
    data = apply_env_overrides(dict(data), environ)
    try:
        data = resolve_env(data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        cfg = SluiceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation(e)}") from None
    registry = plugin_registry() if registry is None else registry
    chains: list[list[tuple[type[Plugin], PluginConfig]]] = []
    for ri, route in enumerate(cfg.routes):
        chain: list[tuple[type[Plugin], PluginConfig]] = []
        ids: set[str] = set()
        for pi, entry in enumerate(route.chain):
            where = f"routes[{ri}].chain[{pi}]"
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ConfigError(f"{source}: {where}: each chain entry is one mapping '- name: {{config}}'")
            (name, pconf), = entry.items()
            cls = registry.get(name)
            if cls is None:
                known = ", ".join(sorted(registry)) or "none"
                raise ConfigError(f"{source}: {where}: unknown plugin {name!r} (known: {known})")
            try:
                model = cls.Config.model_validate(pconf or {})
            except ValidationError as e:
                raise ConfigError(f"{source}: {format_validation(e, f'{where}.{name}', plugin=name)}") from None
            try:
                cls.check(model, cfg)
            except ValueError as e:
                raise ConfigError(f"{source}: {where}.{name}.{e} (plugin {name})") from None
            label = model.id or cls.name
            if label in ids:
                raise ConfigError(
                    f"{source}: {where}.{name}: plugin {name!r} appears twice in this chain; give each an 'id' (plugin {name})"
                )
            ids.add(label)
            chain.append((cls, model))
        chains.append(chain)
    return LoadedConfig(cfg, chains, source)
