"""auth: config validation, the request hook, and keys through a real server with the openai SDK."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import openai
import pytest
from pydantic import ValidationError

from plugins.auth import Auth, AuthConfig, KeyStore, hash_key, parse_duration
from proxy import Identity, ProxyError
from proxy.config import StateConfig
from proxy.state import StateHub
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context, make_runtime

STATIC = "sk-static-0123456789abcdef"
CHAT = {"model": "sluice-demo", "messages": [{"role": "user", "content": "hi"}]}


# -- config ------------------------------------------------------------------

@pytest.mark.parametrize(
    "conf, message",
    [
        ({"virtual_keys": False}, "Value error, no keys can ever match: add static 'keys' or enable 'virtual_keys'"),
        ({"keys": [{"key": STATIC, "id": "a"}, {"key": STATIC + "x", "id": "a"}]}, "Value error, keys: duplicate id 'a'"),
        ({"keys": [{"key": STATIC, "id": "a"}, {"key": STATIC, "id": "b"}]}, "Value error, keys: two static keys have the same secret"),
        ({"keys": [{"key": "short", "id": "a"}]}, "String should have at least 16 characters"),
        ({"cache_ttl_s": 301}, "Input should be less than or equal to 300"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(conf, message):
    with pytest.raises(ValidationError) as err:
        AuthConfig.model_validate(conf)
    assert message in [e["msg"] for e in err.value.errors()]


def test_config_defaults_and_durations():
    c = AuthConfig.model_validate({"headers": ["Authorization", "X-Api-Key"]})
    assert c.headers == ["authorization", "x-api-key"]
    assert c.virtual_keys and c.store == "auto" and c.cache_ttl_s == 5.0 and c.strip_credentials
    assert [parse_duration(x) for x in ("90", "90s", "15m", "12h", "30d", "1w")] == [90, 90, 900, 43200, 2592000, 604800]
    with pytest.raises(ValueError):
        parse_duration("soon")


# -- the hook ------------------------------------------------------------------

@pytest.fixture
async def runtime(tmp_path):
    rt = await make_runtime(tmp_path)
    yield rt
    await rt.close_all()


async def _auth(runtime, **conf):
    conf.setdefault("keys", [{"key": STATIC, "id": "app", "team": "blue", "models": ["sluice-*"], "limits": {"requests_per_minute": 5}}])
    return await configure_plugin(Auth, conf, runtime=runtime)


async def _refused(plugin, ctx) -> ProxyError:
    with pytest.raises(ProxyError) as err:
        await plugin.on_request(ctx)
    return err.value


async def test_static_key_sets_identity_and_strips_credentials(runtime):
    auth = await _auth(runtime)
    for headers in ({"Authorization": f"Bearer {STATIC}"}, {"authorization": f"bearer  {STATIC} "}, {"api-key": STATIC}):
        ctx = make_context(CHAT, headers={**headers, "x-other": "kept"}, runtime=runtime)
        await auth.on_request(ctx)
        assert ctx.identity == Identity(key_id="app", team="blue", models=("sluice-*",), limits={"requests_per_minute": 5})
        assert "authorization" not in ctx.headers and "api-key" not in ctx.headers
        assert ctx.headers["x-other"] == "kept"


async def test_missing_unknown_and_wrong_scheme_are_401(runtime):
    auth = await _auth(runtime)
    err = await _refused(auth, make_context(CHAT, runtime=runtime))
    assert (err.status, err.code, err.type) == (401, "missing_api_key", "authentication_error")
    err = await _refused(auth, make_context(CHAT, headers={"authorization": "Bearer sk-nope-0000000000000000"}, runtime=runtime))
    assert (err.status, err.code, err.message) == (401, "invalid_api_key", "Incorrect API key provided.")
    err = await _refused(auth, make_context(CHAT, headers={"authorization": f"Basic {STATIC}"}, runtime=runtime))
    assert err.code == "missing_api_key"
    assert STATIC not in err.message and "sk-nope" not in err.body().decode()


async def test_model_not_allowed_is_403(runtime):
    auth = await _auth(runtime)
    ctx = make_context({**CHAT, "model": "gpt-4o"}, headers={"api-key": STATIC}, runtime=runtime)
    err = await _refused(auth, ctx)
    assert (err.status, err.code, err.param) == (403, "model_not_allowed", "model")
    assert "gpt-4o" not in err.message


async def test_a_restricted_key_reaches_no_other_model_through_a_deployment_path_or_a_batch(runtime):
    """Only the body's model was checked: a key for sluice-* reached the gpt-4o deployment by naming an allowed
    model in the body (Azure runs the deployment the path names), and ran any model through a batch. A
    route whose prefix ends inside the API's name, or holds all of it, still checks the model calls it serves."""
    auth = await _auth(runtime)
    key = {"api-key": STATIC}
    for path in ("/openai/deployments/gpt-4o/chat/completions", "/openai/deployments/gpt-4o/embeddings"):
        err = await _refused(auth, make_context(CHAT, path=path, headers=key, runtime=runtime))
        assert (err.status, err.code) == (403, "model_not_allowed"), path
    await auth.on_request(make_context(CHAT, path="/openai/deployments/sluice-demo/chat/completions", headers=key, runtime=runtime))
    # the deployment is allowed, the body's model is not: refused as before
    err = await _refused(auth, make_context({**CHAT, "model": "gpt-4o"}, path="/openai/deployments/sluice-demo/chat/completions",
                                            headers=key, runtime=runtime))
    assert err.code == "model_not_allowed"
    # a batch's requests name their own models, in a file Sluice does not read: not open to a restricted key
    for path in ("/v1/batches", "/openai/batches"):
        body = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        err = await _refused(auth, make_context(body, path=path, headers=key, runtime=runtime))
        assert (err.status, err.code) == (403, "model_not_allowed"), path
    await auth.on_request(make_context(None, method="GET", path="/v1/batches/batch_1", headers=key, runtime=runtime))
    # no model in the body of a model call, on routes that end inside the API's name or hold all of it
    for prefix in ("/v1/chat/", "/v1/chat/completions", "/agents/"):
        route = SimpleNamespace(prefix=prefix, name="r")
        ctx = make_context({"messages": CHAT["messages"]}, path="/v1/chat/completions" if prefix != "/agents/" else "/agents/chat/completions",
                           headers=key, runtime=runtime)
        ctx.route = route
        assert (await _refused(auth, ctx)).code == "model_not_allowed", prefix


async def test_a_restricted_key_must_name_an_allowed_model_wherever_the_request_carries_it(runtime):
    """No model, a null or a list, or a model in a multipart form got past the check (the upstream then
    served its default); GET /models/{id} showed any model."""
    auth = await _auth(runtime)
    key = {"api-key": STATIC}
    for body in ({"messages": CHAT["messages"]}, {**CHAT, "model": None}, {**CHAT, "model": ["sluice-demo"]}):
        err = await _refused(auth, make_context(body, headers=key, runtime=runtime))
        assert (err.status, err.code) == (403, "model_not_allowed"), body

    def form(model: str) -> bytes:
        return (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
                b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model.encode() + b'\r\n--B--\r\n')

    multipart = {**key, "content-type": "multipart/form-data; boundary=B"}
    for model, allowed in (("gpt-4o-transcribe", False), ("sluice-whisper", True)):
        ctx = make_context(form(model), path="/v1/audio/transcriptions", headers=multipart, runtime=runtime)
        if allowed:
            await auth.on_request(ctx)
        else:
            assert (await _refused(auth, ctx)).code == "model_not_allowed"
    nameless = b'--B\r\nContent-Disposition: form-data; name="file"; filename="model"\r\n\r\nRIFF\r\n--B--\r\n'
    err = await _refused(auth, make_context(nameless, path="/v1/audio/transcriptions", headers=multipart, runtime=runtime))
    assert err.code == "model_not_allowed"
    # the model in the path of GET /models/{id}: 404 as OpenAI answers a model the caller cannot use
    err = await _refused(auth, make_context(None, method="GET", path="/v1/models/gpt-4o", headers=key, runtime=runtime))
    assert (err.status, err.code) == (404, "model_not_found")
    for path in ("/v1/models/sluice-demo", "/v1/models"):
        await auth.on_request(make_context(None, method="GET", path=path, headers=key, runtime=runtime))
    # not a call to a model: a file upload names none and passes
    await auth.on_request(make_context(nameless, path="/v1/files", headers=multipart, runtime=runtime))
    # two model fields: servers differ on which wins (Starlette takes the last), so neither is trusted
    twice = form("sluice-whisper")[:-len(b"--B--\r\n")] + b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n--B--\r\n'
    err = await _refused(auth, make_context(twice, path="/v1/audio/transcriptions", headers=multipart, runtime=runtime))
    assert err.code == "model_not_allowed"
    # the whole path decides, not its last segments: a thread's messages or a stored completion's update
    # run no model; a fine-tuned model another team owns cannot be deleted either
    for path in ("/v1/threads/thread_1/messages", "/v1/chat/completions/chatcmpl-1"):
        await auth.on_request(make_context({"role": "user", "content": "x"}, path=path, headers=key, runtime=runtime))
    err = await _refused(auth, make_context(None, method="DELETE", path="/v1/models/ft:gpt-4o:other:abc", headers=key, runtime=runtime))
    assert (err.status, err.code) == (404, "model_not_found")


async def test_revoked_and_expired_virtual_keys(runtime):
    auth = await _auth(runtime)
    store: KeyStore = auth.store
    secret, rec = await store.create(name="svc", team="red", limits={"tokens_per_minute": 1000})
    old, rec_old = await store.create(name="old", expires_at=time.time() - 1)
    ctx = make_context(CHAT, headers={"authorization": f"Bearer {secret}"}, runtime=runtime)
    await auth.on_request(ctx)
    assert ctx.identity.key_id == rec.id and ctx.identity.team == "red" and ctx.identity.limits == {"tokens_per_minute": 1000}
    err = await _refused(auth, make_context(CHAT, headers={"api-key": old}, runtime=runtime))
    assert (err.status, err.code, err.message) == (401, "api_key_expired", "This API key has expired.")
    await store.revoke(rec.id)
    auth._cache.clear()
    err = await _refused(auth, make_context(CHAT, headers={"api-key": secret}, runtime=runtime))
    assert (err.status, err.code, err.message) == (401, "api_key_revoked", "This API key has been revoked.")


async def test_only_the_hash_is_stored(runtime, tmp_path):
    auth = await _auth(runtime)
    secret, rec = await auth.store.create(name="svc")
    await runtime.state.records("keys").flush()
    raw = (tmp_path / "keys.db").read_bytes() + (tmp_path / "keys.db-wal").read_bytes() if (tmp_path / "keys.db-wal").exists() else (tmp_path / "keys.db").read_bytes()
    assert secret.encode() not in raw
    assert hash_key(secret).encode() in raw
    assert "key" not in rec.public() and "hash" not in rec.public()


async def test_failed_attempts_are_limited_per_client_address(runtime):
    auth = await _auth(runtime, max_failures=3)
    bad = {"authorization": "Bearer sk-wrong-000000000000000"}
    for _ in range(3):
        assert (await _refused(auth, make_context(CHAT, headers=bad, runtime=runtime, client_ip="10.0.0.9"))).status == 401
    # now even a good key from that address waits: guessing cannot tell success apart
    err = await _refused(auth, make_context(CHAT, headers={"api-key": STATIC}, runtime=runtime, client_ip="10.0.0.9"))
    assert (err.status, err.code) == (429, "too_many_auth_failures")
    assert int(err.headers["retry-after"]) >= 1
    ok = make_context(CHAT, headers={"api-key": STATIC}, runtime=runtime, client_ip="10.0.0.10")
    await auth.on_request(ok)
    assert ok.identity is not None


async def test_an_answered_request_is_left_alone(runtime):
    auth = await _auth(runtime)
    ctx = make_context(CHAT, headers={"authorization": "Bearer whatever"}, runtime=runtime)
    ctx.reply(200, {"cached": True})
    await auth.on_request(ctx)
    assert ctx.identity is None and ctx.headers["authorization"] == "Bearer whatever"


async def test_optional_auth_lets_anonymous_through(runtime):
    auth = await _auth(runtime, required=False)
    ctx = make_context(CHAT, runtime=runtime)
    await auth.on_request(ctx)
    assert ctx.identity is None


# -- through a server ----------------------------------------------------------

def _config(up: FakeUpstream, **auth) -> dict:
    return {
        "upstreams": {"up": {"url": up.url, "api_key": "upstream-secret"}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "up", "chain": [{"auth": auth}]}],
    }


async def _admin(s: SluiceServer, method: str, path: str, json=None, token: str | None = "admin-token"):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, s.admin_url + path, json=json, headers=headers) as r:
            return r.status, await r.json()


@pytest.fixture
async def sdk():
    """openai.AsyncOpenAI clients that are all closed at the end of the test."""
    made: list[openai.AsyncOpenAI] = []

    def make(base_url: str, api_key: str) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0))
        return made[-1]

    yield make
    for c in made:
        await c.close()


STORES = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=STORES)
def store_config(request):
    if request.param == "sqlite":
        return {}
    return {"state": {"redis": {"url": request.getfixturevalue("redis_server").url, "key_prefix": f"t{time.monotonic_ns()}:"}}}


async def test_virtual_keys_end_to_end(tmp_path, store_config, sdk):
    async with FakeUpstream() as up, SluiceServer({**_config(up, cache_ttl_s=30), **store_config}, tmp_path) as s:
        status, _ = await _admin(s, "POST", "/admin/keys", {"name": "svc"}, token=None)
        assert status == 401
        status, bad = await _admin(s, "POST", "/admin/keys", {"limits": {"rpm": 5}})
        assert status == 400 and bad["error"]["message"] == "Invalid key spec: limits.rpm: Extra inputs are not permitted"
        deep: Any = 1
        for _ in range(300):
            deep = [deep]
        status, bad = await _admin(s, "POST", "/admin/keys", {"metadata": {"x": deep}})  # was a 500
        assert status == 400 and "metadata: Value error, nested too deeply to store" in bad["error"]["message"]
        status, created = await _admin(s, "POST", "/admin/keys", {"name": "svc", "team": "blue", "models": ["sluice-*"],
                                                                  "limits": {"requests_per_minute": 100}, "expires_in_s": 3600})
        assert status == 201 and created["key"].startswith("sk-sluice-") and created["status"] == "active"
        secret, key_id = created["key"], created["id"]

        client = sdk(s.url, secret)
        r = await client.chat.completions.create(**CHAT)
        assert r.choices[0].message.content
        # the client's key never reaches the upstream; the upstream's own key does
        seen = up.requests[-1].headers
        assert seen.get("Authorization") == "Bearer upstream-secret" or seen.get("authorization") == "Bearer upstream-secret"
        assert secret not in str(seen)

        models = await client.models.list()
        assert [m.id for m in models.data] and all(m.id.startswith("sluice-") for m in models.data)

        status, listing = await _admin(s, "GET", "/admin/keys")
        assert status == 200 and [k["id"] for k in listing["data"]] == [key_id]
        assert secret not in str(listing) and hash_key(secret) not in str(listing)

        with pytest.raises(openai.PermissionDeniedError) as err:
            await client.chat.completions.create(**{**CHAT, "model": "gpt-4o"})
        assert err.value.body["code"] == "model_not_allowed"

        # rotation: the new secret works at once, the old one stops (no grace)
        status, rotated = await _admin(s, "POST", f"/admin/keys/{key_id}/rotate")
        assert status == 201 and rotated["id"] != key_id
        with pytest.raises(openai.AuthenticationError) as err:
            await client.chat.completions.create(**CHAT)
        assert err.value.body["code"] == "api_key_revoked"
        new = sdk(s.url, rotated["key"])
        await new.chat.completions.create(**CHAT)

        # an admin revoke in this process takes effect at once, cache or not
        status, revoked = await _admin(s, "DELETE", f"/admin/keys/{rotated['id']}")
        assert status == 200 and revoked["status"] == "revoked"
        with pytest.raises(openai.AuthenticationError):
            await new.chat.completions.create(**CHAT)
        assert (await _admin(s, "POST", "/admin/keys/key_0000000000000000/revoke"))[0] == 404
        bad = sdk(s.url, "sk-sluice-nothing")
        with pytest.raises(openai.AuthenticationError) as err:
            await bad.chat.completions.create(**CHAT)
        assert err.value.body == {"message": "Incorrect API key provided.", "type": "authentication_error", "param": None, "code": "invalid_api_key"}


async def test_a_revoke_elsewhere_reaches_a_server_within_the_cache_ttl(tmp_path, store_config, sdk):
    """Another process (the CLI, another replica) revokes: the cached key stops within cache_ttl_s."""
    ttl = 0.5
    async with FakeUpstream() as up, SluiceServer({**_config(up, cache_ttl_s=ttl), **store_config}, tmp_path) as s:
        other = StateHub(StateConfig.model_validate({**s.data["state"]}))
        await other.start()
        try:
            store = KeyStore(other)
            secret, rec = await store.create(name="svc")
            client = sdk(s.url, secret)
            await client.chat.completions.create(**CHAT)  # now cached in the server
            await store.revoke(rec.id)
            t0 = time.monotonic()
            async with asyncio.timeout(ttl + 5):
                while True:
                    try:
                        await client.chat.completions.create(**CHAT)
                    except openai.AuthenticationError:
                        break
            assert time.monotonic() - t0 <= ttl + 0.5
        finally:
            await other.close()


async def test_keys_cli(tmp_path):
    import json
    import sys

    import yaml

    cfg = tmp_path / "sluice.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"dir": str(tmp_path / "var")}, "routes": [{"match": {"path": "/v1/"}, "chain": [{"auth": {}}]}]}))

    async def sluice(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy.cli", *args, "-c", str(cfg),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    # before any key exists (or with a mistyped state.dir): said, not an empty list
    code, out, err = await sluice("keys", "list")
    assert code == 1 and f"no key store at {tmp_path / 'var' / 'keys.db'}" in err and not (tmp_path / "var" / "keys.db").exists()

    code, out, err = await sluice("keys", "create", "--name", "ci", "--team", "blue", "--model", "sluice-*", "--rpm", "10",
                                  "--budget-per-day", "2.5", "--meta", "owner=ops", "--expires-in", "30d", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["key"].startswith("sk-sluice-") and made["limits"] == {"requests_per_minute": 10, "budget_per_day": 2.5}
    assert made["metadata"] == {"owner": "ops"} and made["expires_at"] > time.time() + 29 * 86400

    code, out, _ = await sluice("keys", "list", "--json")
    assert code == 0 and [k["id"] for k in json.loads(out)] == [made["id"]]
    assert made["key"] not in out

    code, out, _ = await sluice("keys", "rotate", made["id"], "--grace", "1h", "--json")
    assert code == 0
    rotated = json.loads(out)
    code, out, _ = await sluice("keys", "revoke", rotated["id"])
    assert code == 0 and rotated["id"] in out
    code, out, _ = await sluice("keys", "list", "--json", "--all")
    status = {k["id"]: k["status"] for k in json.loads(out)}
    assert status == {made["id"]: "active", rotated["id"]: "revoked"}  # the old one is in its grace hour


@pytest.mark.redis
async def test_redis_store_down_fails_closed_but_cached_keys_still_work(tmp_path, sdk):
    from proxy.testing import RedisServer

    async with RedisServer() as rs, FakeUpstream() as up:
        cfg = {**_config(up, cache_ttl_s=60), "state": {"redis": {"url": rs.url, "timeout_ms": 100}}}
        async with SluiceServer(cfg, tmp_path) as s:
            _, cached = await _admin(s, "POST", "/admin/keys", {"name": "used"})
            _, fresh = await _admin(s, "POST", "/admin/keys", {"name": "unused"})
            await sdk(s.url, cached["key"]).chat.completions.create(**CHAT)
            await rs.astop()
            await sdk(s.url, cached["key"]).chat.completions.create(**CHAT)  # from the cache
            t0 = time.monotonic()
            with pytest.raises(openai.InternalServerError) as err:
                await sdk(s.url, fresh["key"]).chat.completions.create(**CHAT)
            assert time.monotonic() - t0 < 2.0
            assert err.value.status_code == 503 and err.value.body["code"] == "state_unavailable"
            assert rs.url not in str(err.value.body)


@pytest.mark.redis
async def test_failed_attempts_count_across_replicas_and_in_each_process_while_redis_is_down(tmp_path, sdk, caplog):
    """Failed attempts were counted per process: N replicas let an address guess N times as often. With
    Redis they are counted there; while it is unreachable, each process's own count stands in."""
    from proxy.testing import RedisServer

    wrong = "sk-wrong-00000000000000000000"
    async with RedisServer() as rs, FakeUpstream() as up:
        cfg = {**_config(up, virtual_keys=False, keys=[{"key": STATIC, "id": "app"}], max_failures=4),
               "state": {"redis": {"url": rs.url, "timeout_ms": 200}}}
        async with SluiceServer(cfg, tmp_path / "a") as a, SluiceServer(cfg, tmp_path / "b") as b:
            for s in (a, b, a, b):  # two failures on each replica: four from the address in all
                with pytest.raises(openai.AuthenticationError):
                    await sdk(s.url, wrong).chat.completions.create(**CHAT)
            for s in (a, b):  # the address's bucket is empty on both, even for the right key
                with pytest.raises(openai.RateLimitError) as err:
                    await sdk(s.url, STATIC).chat.completions.create(**CHAT)
                assert err.value.body["code"] == "too_many_auth_failures"

            await rs.astop()
            # this process saw two of the four: its own count stands in, and lets the right key through
            r = await sdk(a.url, STATIC).chat.completions.create(**CHAT)
            assert r.choices[0].message.content
            for _ in range(2):  # still 401s, not 503s, while the failures cannot reach Redis
                with pytest.raises(openai.AuthenticationError):
                    await sdk(a.url, wrong).chat.completions.create(**CHAT)
            with pytest.raises(openai.RateLimitError) as err:
                await sdk(a.url, STATIC).chat.completions.create(**CHAT)
            assert err.value.body["code"] == "too_many_auth_failures"
    warned = [r.getMessage() for r in caplog.records if r.name == "sluice.auth"]
    assert len(warned) == 1 and warned[0].startswith("auth: failed attempts cannot be counted in the shared state (")
    assert rs.url not in warned[0]


@pytest.mark.redis
async def test_a_full_redis_leaves_failures_counted_in_the_process(tmp_path, sdk):
    """Redis out of memory (maxmemory, noeviction) answers writes with an error that is not an outage:
    a wrong key got 500 instead of 401."""
    import redis

    from proxy.testing import RedisServer

    wrong = "sk-wrong-00000000000000000000"
    async with RedisServer() as rs, FakeUpstream() as up:
        cfg = {**_config(up, virtual_keys=False, keys=[{"key": STATIC, "id": "app"}], max_failures=2),
               "state": {"redis": {"url": rs.url}}}
        async with SluiceServer(cfg, tmp_path) as s:
            def fill() -> None:
                with redis.Redis.from_url(rs.url) as r:
                    r.config_set("maxmemory-policy", "noeviction")
                    r.config_set("maxmemory", 1)

            await asyncio.to_thread(fill)
            for _ in range(2):
                with pytest.raises(openai.AuthenticationError):
                    await sdk(s.url, wrong).chat.completions.create(**CHAT)
            with pytest.raises(openai.RateLimitError):  # counted in the process: the third is over
                await sdk(s.url, wrong).chat.completions.create(**CHAT)
            # and the right key waits too: Redis still answers reads, but its bucket never got those failures
            with pytest.raises(openai.RateLimitError):
                await sdk(s.url, STATIC).chat.completions.create(**CHAT)


@pytest.mark.redis
async def test_concurrent_guesses_get_no_more_401s_than_failures_left(tmp_path, sdk, redis_server):
    """Each 401 stands for a failure taken from the address's bucket: with one failure left, guesses in
    flight together got a 401 each (the check and the count were apart, a round trip each); and right
    keys in flight together are not refused by each other's checks."""
    wrong = "sk-wrong-00000000000000000000"
    async with FakeUpstream() as up:
        cfg = {**_config(up, virtual_keys=False, keys=[{"key": STATIC, "id": "app"}], max_failures=2),
               "state": {"redis": {"url": redis_server.url, "key_prefix": f"t{time.monotonic_ns()}:"}}}
        async with SluiceServer(cfg, tmp_path / "a") as a, SluiceServer(cfg, tmp_path / "b") as b:
            with pytest.raises(openai.AuthenticationError):
                await sdk(a.url, wrong).chat.completions.create(**CHAT)  # one failure left

            # the right key from the address, many at once: a look at the bucket holds no unit, so none of
            # them is refused (a check that took a unit and gave it back refused the ones in between)
            oks = await asyncio.gather(*(sdk(a.url, STATIC).chat.completions.create(**CHAT) for _ in range(6)))
            assert all(r.choices[0].message.content for r in oks)

            async def guess(s: SluiceServer) -> int:
                try:
                    await sdk(s.url, wrong).chat.completions.create(**CHAT)
                except openai.APIStatusError as e:
                    return e.status_code
                return 200

            codes = await asyncio.gather(*(guess(s) for s in (a, b) * 4))
            assert codes.count(401) <= 1 and set(codes) <= {401, 429}, codes
            for s in (a, b):
                assert await guess(s) == 429
            with pytest.raises(openai.RateLimitError):
                await sdk(b.url, STATIC).chat.completions.create(**CHAT)




async def test_on_response_only_when_some_key_may_be_restricted(runtime):
    """/models answers are filtered for keys restricted to some models; without such keys there is no response hook."""
    from proxy.registry import hook_functions

    free = await _auth(runtime, virtual_keys=False, keys=[{"key": STATIC, "id": "app"}])
    assert "on_response" not in hook_functions(free)
    for conf in ({}, {"virtual_keys": False}):  # virtual keys may carry models; the default static key does
        assert "on_response" in hook_functions(await _auth(runtime, **conf)), conf


def test_key_limits_are_checked_as_counts_or_money():
    from plugins.auth import check_limits

    assert check_limits({"requests_per_minute": 5, "budget_per_day": 2.5}) == {"requests_per_minute": 5, "budget_per_day": 2.5}
    for bad in ({"requests_per_minute": 2.5}, {"budget_per_day": 0}, {"budget_per_day": float("inf")},
                {"budget_per_month": 1e300}, {"budget_per_day": True}, {"rpm": 5}):
        with pytest.raises(ValueError):
            check_limits(bad)
