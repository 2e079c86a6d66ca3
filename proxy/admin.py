"""The admin listener: health, metrics, reload, config summary, and the plugins' admin endpoints."""

from __future__ import annotations

import hmac
import logging
import os
import signal
from typing import TYPE_CHECKING, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .config import load_config
from .errors import ConfigError, ProxyError
from .handler import error_response, new_request_id
from .metrics import exposition
from .registry import plugin_registry

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("sluice.admin")


def _bearer(request: web.Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h[:7].lower() != "bearer ":
        return None
    # HTTP's own whitespace only: str.strip() takes a no-break space away too, and "Bearer \u00a0" became ""
    return h[7:].strip(" \t") or None


def _allowed(expected: str | None, request: web.Request) -> bool:
    got = _bearer(request)
    if not expected or got is None:
        return False  # no token (or an empty one) opens nothing
    # a header's bytes that are not UTF-8 arrive as surrogates: compared as sent (encode() raised: a 500)
    return hmac.compare_digest(got.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def make_admin_app(server: Server) -> web.Application:
    app = web.Application()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = new_request_id()
        if request.path.startswith("/admin/"):
            token = server.loaded.config.admin.token
            if token is None:
                return error_response(403, "The admin API is disabled: set admin.token.", rid, code="admin_disabled")
            if not _allowed(token, request):
                return error_response(401, "A valid admin bearer token is required.", rid, code="invalid_admin_token")
        elif request.path == "/metrics":
            mt = server.loaded.config.admin.metrics_token
            if mt is not None and not _allowed(mt, request):
                return error_response(401, "A valid metrics bearer token is required.", rid, code="invalid_metrics_token")
        if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
            return error_response(415, "The admin API takes uncompressed JSON bodies.", rid, code="unsupported_content_encoding")
        server.run_batch()  # what the admin API reports includes every request answered so far
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            err = error_response(e.status, e.reason, rid)
            if "Allow" in e.headers:  # a 405 says which methods the path takes
                err.headers["Allow"] = e.headers["Allow"]
            return err
        except ConfigError as e:
            return error_response(400, str(e), rid, code="invalid_config")
        except ProxyError as e:  # a state backend away (503 state_unavailable), an endpoint's own refusal
            log.warning("admin: %s %s answered %d (%s) request_id=%s", request.method, request.path, e.status, e.reason, rid)
            return error_response(e.status, e.message, rid, code=e.code, headers=e.headers)
        except (web.RequestPayloadError, HttpProcessingError) as e:  # a body that cannot be read (cut, badly chunked)
            log.info("admin: refused an unreadable request body (%s) request_id=%s", type(e).__name__, rid)
            return error_response(400, "The request body could not be read.", rid, code="invalid_body")
        except Exception as e:
            # the kind only: a message may quote what the client sent, a traceback the state it held
            log.error("admin: %s %s failed (%s) request_id=%s", request.method, request.path, type(e).__name__, rid,
                      exc_info=e if server.debug else None)
            return error_response(500, "Sluice failed to process the admin request.", rid, code="internal_error")
        resp.headers.setdefault("x-request-id", rid)
        return resp

    app.middlewares.append(guard)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ok, detail = await server.readiness()
        return web.json_response(detail, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        body = exposition(server.runtime.metrics)
        return web.Response(body=body, headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})

    async def reload(request: web.Request) -> web.Response:
        if os.environ.get("SLUICE_WORKER") is not None:
            # several workers: check the file here, then let the master tell every worker
            server.check_reloadable(load_config(server.config_path))
            os.kill(os.getppid(), signal.SIGHUP)
            return web.json_response({"status": "reloading", "workers": "all"}, status=202)
        ok, message = await server.reload()
        if not ok:
            return error_response(400, message, new_request_id(), code="invalid_config")
        return web.json_response({"status": "reloaded", "source": server.loaded.source})

    async def config_summary(request: web.Request) -> web.Response:
        cfg = server.loaded.config
        return web.json_response(
            {
                "source": server.loaded.source,
                "upstreams": {n: {"url": shown_url(u.url), "kind": u.kind, "models": u.models} for n, u in cfg.upstreams.items()},
                "routes": [
                    {"name": r.name, "prefix": r.prefix, "upstreams": [t.upstream for t in r.default_targets], "chain": [p.id for p in r.plugins]}
                    for r in sorted(server.generation.routes, key=lambda r: r.index)
                ],
            }
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/config", config_summary)
    for cls in plugin_registry().values():
        for route in cls.admin_routes():
            app.router.add_route(route.method, "/admin/" + route.path.lstrip("/"), _bind(route.handler, server))
    return app


def _bind(fn, server: Server) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await fn(request, server.generation.runtime)

    return handler


def shown_url(url: str) -> str:
    """An upstream's URL for the admin API: a password in it and the values of its query (a key some
    providers take there) are masked; the rest is as configured."""
    from yarl import URL

    u = URL(url)
    if u.password is not None:
        u = u.with_password("***")
    if u.query_string:
        u = u.with_query([(k, "***") for k in u.query.keys()])
    return str(u)
