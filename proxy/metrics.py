"""The core's own Prometheus metrics and the registry plugins add theirs to.

With ``server.workers > 1`` the master sets ``PROMETHEUS_MULTIPROC_DIR`` before
the workers start; every process then writes its values there and one scrape
of any worker shows the sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import multiprocess


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def make_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def exposition(registry: CollectorRegistry) -> bytes:
    if multiprocess_mode():
        agg = CollectorRegistry()
        multiprocess.MultiProcessCollector(agg)
        return generate_latest(agg)
    return generate_latest(registry)


class CoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.plugin_errors = Counter(
            "sluice_plugin_errors", "Plugin failures, by plugin instance and phase.", ["plugin", "phase"], registry=registry
        )
        self.dropped = Counter(
            "sluice_background_dropped", "on_done work dropped because the background queue was full.", registry=registry
        )
        self.overflow = Counter(
            "sluice_background_overflow",
            "on_done work that had to wait for room in a full background queue (never dropped: ledgers, lease releases).",
            registry=registry,
        )
        self.reloads = Counter("sluice_config_reloads", "Config reloads, by result.", ["result"], registry=registry)
        self.rejected = Counter(
            "sluice_rejected_requests",
            "Requests answered before any plugin ran: no route matched (route_not_found), the body was too large "
            "(request_too_large), an Expect header other than 100-continue (expectation_failed), a dot segment in "
            "the path (invalid_path), a JSON body that does not parse on a route whose plugins act on requests "
            "(invalid_json), a content-encoding Sluice cannot read (unsupported_encoding), a compressed body that is not "
            "one whole stream (invalid_encoding), a body that ended "
            "before its Content-Length (incomplete_body), a body that stalled (body_timeout), a request that is not valid "
            "HTTP/1.1 (invalid_http), a request line or header over 8190 bytes (header_too_large).",
            ["reason"], registry=registry,
        )
        self.records_dropped = Counter(
            "sluice_records_dropped",
            "Rows a records writer gave up after a write error (SQLite locked past state.sqlite_timeout_ms, disk full, "
            "a value SQLite refused), by records file and table: ledger rows lost. Stays 0 in a healthy process.",
            ["records", "table"], registry=registry,
        )

    def record_dropped(self, records: str, table: str, n: int) -> None:
        self.records_dropped.labels(records=records, table=table).inc(n)

    def plugin_error(self, plugin_id: str, phase: str) -> None:
        self.plugin_errors.labels(plugin=plugin_id, phase=phase).inc()
