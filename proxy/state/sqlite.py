"""SQLite state: append-only records through a batched writer thread, and a KV with TTL.

The event loop never touches a SQLite connection: rows are queued to one writer
thread per file (batched by ``batch_size`` rows or ``flush_interval_ms``), reads
and KV calls run on a dedicated thread, and every awaited call is bounded by
``sqlite_timeout_ms`` (raising :class:`proxy.errors.StateUnavailable`). Files use
WAL so several worker processes can share them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import operator
import re
import sqlite3
import threading
import time
from collections import defaultdict, deque
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..errors import StateUnavailable
from .base import KV, Records, Table

log = logging.getLogger("sluice.state")
T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CLOSE_WAIT_S = 30.0


def _locked(e: sqlite3.OperationalError) -> bool:
    text = str(e)
    return "locked" in text or "busy" in text


def retrying(fn: Callable[[], T], timeout_ms: int) -> T:
    """Run ``fn`` again while SQLite says locked or busy, up to ``timeout_ms``.

    The busy handler does not cover every case: two connections opening a new
    file at once (one switching it to WAL) get SQLITE_BUSY at once, without
    waiting. Only ever called on a worker thread, never on the loop.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    pause = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _locked(e) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def connect(path: Path, timeout_ms: int, *, read_only: bool = False, synchronous: str = "NORMAL") -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
    if read_only:
        conn.execute("PRAGMA query_only=1")
    else:
        retrying(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall(), timeout_ms)
        conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class _Thread:
    """One thread, one connection, jobs awaited with a timeout."""

    def __init__(self, name: str, opener: Callable[[], sqlite3.Connection], timeout_s: float) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._opener = opener
        self._conn: sqlite3.Connection | None = None
        self.timeout_s = timeout_s

    def _with_conn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._opener()
        return fn(self._conn)

    async def run(self, fn: Callable[[sqlite3.Connection], T], timeout_s: float | None = None) -> T:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._with_conn, fn)
        try:
            return await asyncio.wait_for(fut, self.timeout_s if timeout_s is None else timeout_s)
        except (asyncio.TimeoutError, sqlite3.OperationalError) as e:
            log.warning("sqlite: %s", type(e).__name__)
            raise StateUnavailable(reason="sqlite_unavailable") from None

    def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            self._pool.submit(_close)
        except RuntimeError:
            pass
        self._pool.shutdown(wait=True)


class SQLiteRecords(Records):
    """Rows appended to ``path`` by a background writer thread, in batches.

    Tables declared with a primary key are upserted (the last row with a key
    wins); others are plain appends. New columns in a row are added to the table.
    Each wake-up of the writer drains everything queued and writes it per table in
    one transaction (``executemany`` over runs of rows with the same columns, one
    commit), so a row costs a few microseconds of the writer's CPU, not a commit.
    """

    def __init__(self, path: Path, *, timeout_ms: int = 2000, batch_size: int = 500, flush_interval_ms: int = 1000) -> None:
        self.path = Path(path)
        self.timeout_ms = timeout_ms
        self.batch_size = batch_size
        self.interval_s = flush_interval_ms / 1000
        # rows are appended to a deque without waking the writer (deque.append is atomic);
        # the writer drains it every interval, or at once when a batch is full or a
        # flush or close asks for it
        self._q: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._pks: dict[str, str | None] = {}
        # writer thread only: known columns per table, and INSERT statements per column set
        self._cols: dict[str, frozenset[str]] = {}
        self._stmts: dict[tuple[str, tuple[str, ...], str | None, int], str] = {}
        #: writer thread only: rows of each table a lock held past the timeout kept from the file, written
        #: first at the next wakes (at most HELD_MAX a table; at close, what is still held is given up)
        self._held: dict[str, list[Any]] = {}
        #: rows given up after a write error (logged); stays 0 in a healthy process
        self.dropped = 0
        #: ``dropped`` when the last flush was answered (a flush fails if rows were given up since)
        self._dropped_told = 0
        #: the monotonic time the file last refused a write (a full disk, an I/O error; not one bad row),
        #: -inf once a write goes through, +inf when the file cannot be opened at all: see failing_now()
        self.refused_at = -math.inf
        #: called (on the writer thread) with a table's name and how many of its rows were given up
        self.on_dropped: Callable[[str, int], None] | None = None
        self.written = 0
        #: transactions written (one per table per wake-up of the writer, when all goes well)
        self.batches = 0
        self._closed = False
        self._reader = _Thread("sluice-sqlite-read", lambda: connect(self.path, timeout_ms, read_only=True), timeout_ms / 1000)
        self._thread = threading.Thread(target=self._run, name=f"sluice-records-{self.path.stem}", daemon=True)
        self._thread.start()

    # -- loop side -----------------------------------------------------------
    def ensure(self, table: Table) -> None:
        if not _NAME.match(table.name):
            raise ValueError(f"invalid table name {table.name!r}")
        self._pks[table.name] = table.pk
        self._q.append(("ensure", table))
        self._wake.set()

    def append(self, table: str, row: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("records are closed")
        q = self._q
        q.append(("row", table, dict(row)))
        # a full batch wakes the writer once (Event.set takes a lock): it clears the event
        # before draining, so a row appended after that either is drained or sets it again
        if len(q) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def append_values(self, table: str, columns: tuple[str, ...], values: tuple[Any, ...]) -> None:
        """Queue one row given as its values in ``columns`` order: ``append(table, dict(zip(columns, values)))``
        without a dict built or copied (for a caller that writes many rows of one shape, such as a ledger;
        pass the same ``columns`` tuple every time). The values are not copied: pass a fresh tuple."""
        if self._closed:
            raise RuntimeError("records are closed")
        q = self._q
        q.append(("row", table, _Values(columns, values)))
        if len(q) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    async def flush(self) -> None:
        """Every row appended so far is in the file; rows another process's lock holds out are waited for.
        :class:`StateUnavailable` when they are still held after ``timeout_ms`` plus 5 s, or when a row was
        given up since the last flush answered (a full disk, a read-only file): a caller that must know its
        row is stored (a key revoked) is not told it is."""
        await self._signal("flush", self.timeout_ms / 1000 + self.interval_s + 5)

    async def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = (), *,
                    timeout_s: float | None = None) -> list[dict[str, Any]]:
        # what was appended first, without failing a read for rows given up before it
        await self._signal("sync", self.timeout_ms / 1000 + self.interval_s + 5)

        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = conn.execute(sql, params)
            cols = [d[0] for d in cur.description or ()]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

        return await self._reader.run(run, timeout_s)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._signal("close", _CLOSE_WAIT_S)
        finally:
            await asyncio.to_thread(self._reader.close)

    async def _signal(self, kind: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def settle(ok: bool) -> None:
            if not fut.done():
                if ok:
                    fut.set_result(None)
                else:
                    fut.set_exception(StateUnavailable(f"rows could not be written to {self.path.name}", reason="sqlite_unavailable"))

        def done(ok: bool = True) -> None:
            try:
                loop.call_soon_threadsafe(settle, ok)
            except RuntimeError:  # the loop is gone: nobody is waiting any more
                pass

        self._q.append((kind, done))
        self._wake.set()
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise StateUnavailable(reason="sqlite_unavailable") from None

    # -- writer thread -------------------------------------------------------
    def _run(self) -> None:
        import sqlite_utils

        try:
            conn = connect(self.path, self.timeout_ms, synchronous="FULL")
        except (sqlite3.Error, OSError) as e:
            log.error("sqlite: cannot open %s: %s; its rows are dropped", self.path.name, e)
            self._unwritable()
            return
        db = sqlite_utils.Database(conn)
        pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
        # flushes asked for while rows are held under another process's lock: answered once those are written
        # (a key revoked is reported done only once it is in the file), or at close
        flushes: list[tuple[Any, ...]] = []
        q = self._q
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            count = 0
            while q:
                item = q.popleft()
                kind = item[0]
                if kind == "row":
                    pending[item[1]].append(item[2])
                    count += 1
                    if count >= self.batch_size:
                        count = self._write(db, pending)
                    continue
                count = self._write(db, pending)
                if kind == "ensure":
                    self._ensure(db, item[1])
                    self._cols.pop(item[1].name, None)
                elif kind == "flush" or kind == "sync":
                    if self._held:
                        flushes.append(item)
                    else:
                        self._answer(item)
                elif kind == "close":
                    self._write(db, pending)
                    for name, rows in self._held.items():  # still locked: nothing more can be done
                        self._dropped(name, len(rows))
                        log.error("sqlite: gave up %d rows of %s at close: %s stayed locked", len(rows), name, self.path.name)
                    self._held.clear()
                    conn.close()
                    for waiting in flushes:
                        self._answer(waiting)
                    item[1]()
                    return
            if count or self._held:
                self._write(db, pending)
            if flushes and not self._held:
                for waiting in flushes:
                    self._answer(waiting)
                flushes.clear()

    def failing_now(self) -> bool:
        """For /readyz: the file cannot be opened, or refused a write within FAILING_FOR_S. Not for ever
        after one refusal: a replica out of service gets no rows, and no write would clear it."""
        return time.monotonic() - self.refused_at < FAILING_FOR_S

    def _unwritable(self) -> None:
        """The file cannot be opened: count what arrives and answer waiters, never hang them."""
        self.refused_at = math.inf
        q = self._q
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            while q:
                item = q.popleft()
                if item[0] == "row":
                    self._dropped(item[1], 1)
                elif item[0] == "close":
                    item[1]()
                    return
                elif item[0] != "ensure":
                    self._answer(item)

    def _answer(self, item: tuple[Any, ...]) -> None:
        """Answer a flush: failed when a row was given up since the last flush answered (a sync, a read's
        wait for what was appended before it, is answered all the same)."""
        lost = self.dropped != self._dropped_told
        if item[0] == "flush":
            self._dropped_told = self.dropped
        item[1](not lost or item[0] == "sync")

    def _dropped(self, table: str, n: int) -> None:
        self.dropped += n
        if self.on_dropped is not None:
            try:
                self.on_dropped(table, n)
            except Exception as e:  # a counter must not stop the writer
                log.error("sqlite: counting dropped rows failed: %s", type(e).__name__)

    def _ensure(self, db: Any, table: Table) -> None:
        try:
            retrying(lambda: self._create(db, table), self.timeout_ms)
        except sqlite3.Error as e:
            log.error("sqlite: cannot create table %s in %s: %s", table.name, self.path.name, e)

    def _create(self, db: Any, table: Table) -> None:
        t = db[table.name]
        if not t.exists():
            t.create(dict(table.columns), pk=table.pk, if_not_exists=True)
        else:
            have = set(t.columns_dict)
            for col, typ in table.columns.items():
                if col not in have:
                    t.add_column(col, typ)
        for idx in table.indexes:
            t.create_index(list(idx), if_not_exists=True)

    def _write(self, db: Any, pending: dict[str, list[dict[str, Any]]]) -> int:
        """Write every pending row: one transaction (one commit) per table per wake-up. Rows a lock held
        past the timeout kept out are held, in order, and tried first at the next wake-up."""
        if self._held:
            for name, rows in self._held.items():
                pending.setdefault(name, [])[:0] = rows
            self._held.clear()
        for name, rows in list(pending.items()):
            if not rows:
                continue
            try:
                retrying(lambda: self._insert(db, name, rows), self.timeout_ms)
                self.written += len(rows)
                self.batches += 1
                self.refused_at = -math.inf
            except _ROW_ERRORS as e:
                if len(rows) == 1:
                    self._dropped(name, 1)
                    log.error("sqlite: dropped 1 row of %s: %s", name, e)
                else:
                    # a row SQLite refuses must not cost the others: write them one by one
                    log.warning("sqlite: a batch of %d rows of %s failed (%s); writing them one by one", len(rows), name, e)
                    for r in rows:
                        self._write(db, {name: [r]})
            except Exception as e:  # the file, not a row (or anything else: never the writer thread's end)
                keep = rows[-HELD_MAX:] if isinstance(e, sqlite3.OperationalError) and _locked(e) else []
                if not keep:
                    self.refused_at = time.monotonic()
                if keep:
                    # another process holds the file (a backup, a VACUUM): the rows wait for the lock to go
                    log.warning("sqlite: %s is locked: %d rows of %s held for the next try", self.path.name, len(keep), name)
                    self._held[name] = keep
                if len(rows) > len(keep):  # disk full, I/O, a damaged file; or more held rows than HELD_MAX
                    self._dropped(name, len(rows) - len(keep))
                    log.error("sqlite: dropped %d rows of %s: %s", len(rows) - len(keep), name,
                              e if isinstance(e, sqlite3.Error) else type(e).__name__)
            rows.clear()
        pending.clear()
        return 0

    def _insert(self, db: Any, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows in order, in one transaction: ``executemany`` per run of rows with the same columns.

        A run with a column the table lacks (or a table nobody ensured) goes through
        sqlite-utils, which creates the table or adds the columns with types from the
        values; everything else is plain SQL. Values SQLite cannot bind are converted as
        sqlite-utils converts them (JSON for dicts and lists, ISO text for dates).
        """
        conn = db.conn
        pk = self._pks.get(name)
        known = self._columns(conn, name)
        conn.execute("BEGIN IMMEDIATE")
        try:
            i, n = 0, len(rows)
            while i < n:
                keys = rows[i].keys()
                j = i + 1
                while j < n and ((k := rows[j].keys()) is keys or k == keys):
                    j += 1
                run = rows[i:j]
                cols = tuple(keys)
                if known is not None and known.issuperset(cols) and cols:
                    self._insert_rows(conn, name, cols, pk, _params(run, cols))
                else:
                    run = [r.as_dict() if type(r) is _Values else r for r in run]
                    db[name].insert_all(run, pk=pk, replace=pk is not None, alter=True, batch_size=self.batch_size)
                    self._cols.pop(name, None)
                    known = self._columns(conn, name)
                i = j
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._cols.pop(name, None)
            raise

    def _insert_rows(self, conn: sqlite3.Connection, name: str, cols: tuple[str, ...], pk: str | None,
                     params: list[tuple[Any, ...]]) -> None:
        """Rows in order: ``per`` rows per multi-row INSERT, the rest through ``executemany``.

        A multi-row statement is one step for SQLite and one release of the GIL for the
        sqlite3 module, where ``executemany`` takes one per row: about a fifth less of the
        writer's CPU, and fewer hand-overs of the GIL to and from the event loop's thread.
        Rows of one statement apply in order, so with a primary key the last still wins.

        ``None`` is bound as NaN, which SQLite stores as NULL (``sqlite3_bind_double`` turns a
        NaN into NULL): the sqlite3 module binds an int, float or str directly but sends every
        other value, ``None`` included, through its adapter lookup first. A ledger row has a
        third of its values ``None``, and that lookup was about a third of its insert.
        """
        per = max(1, min(_ROWS_PER_STATEMENT, _MAX_VARIABLES // len(cols)))
        full = len(params) - len(params) % per if per > 1 else 0
        if full:
            sql = self._sql(name, cols, pk, per)
            for i in range(0, full, per):
                conn.execute(sql, [_NULL if v is None else v for v in chain.from_iterable(params[i:i + per])])
        if full < len(params):
            conn.executemany(self._sql(name, cols, pk),
                             [[_NULL if v is None else v for v in p] for p in (params[full:] if full else params)])

    def _columns(self, conn: sqlite3.Connection, name: str) -> frozenset[str] | None:
        """The table's columns (cached on the writer thread), ``None`` when it does not exist."""
        cols = self._cols.get(name)
        if cols is None:
            found = frozenset(r[1] for r in conn.execute(f"PRAGMA table_info([{name}])"))
            if not found:
                return None
            cols = self._cols[name] = found
        return cols

    def _sql(self, name: str, cols: tuple[str, ...], pk: str | None, rows: int = 1) -> str:
        key = (name, cols, pk, rows)
        sql = self._stmts.get(key)
        if sql is None:
            verb = "INSERT OR REPLACE" if pk is not None else "INSERT"
            names = ", ".join(f"[{c}]" for c in cols)
            one = f"({', '.join('?' * len(cols))})"
            sql = f"{verb} INTO [{name}] ({names}) VALUES {', '.join([one] * rows)}"
            if len(self._stmts) < 256:
                self._stmts[key] = sql
        return sql


#: how _insert_rows binds None: a float NaN, which SQLite stores as NULL
_NULL = float("nan")
#: rows per multi-row INSERT, within SQLite's oldest default limit of bound variables
_ROWS_PER_STATEMENT = 64
_MAX_VARIABLES = 999
_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})
#: most rows of one table held while their file is locked (each about a few hundred bytes)
HELD_MAX = 200_000
#: how long after a refused write /readyz says SQLite is down (the probe's own write sees a disk still full)
FAILING_FOR_S = 30.0


def _locked(e: sqlite3.OperationalError) -> bool:
    """The file is locked by another connection (SQLITE_BUSY, SQLITE_LOCKED): it will be free again."""
    text = str(e).lower()
    return "locked" in text or "busy" in text


#: errors caused by one row's values, not by the file: a value SQLite cannot bind or convert (an int past
#: 64 bits is an OverflowError, a set a TypeError), a constraint
_ROW_ERRORS = (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.IntegrityError, sqlite3.DataError,
               OverflowError, TypeError, ValueError, KeyError)


class _Values:
    """A row queued by ``append_values``: its columns and its values in their order.

    ``keys()`` gives the columns, so runs of rows of one shape are found as for dicts
    (a dict's keys never equal a tuple: the two kinds never share a run).
    """

    __slots__ = ("cols", "vals")

    def __init__(self, cols: tuple[str, ...], vals: tuple[Any, ...]) -> None:
        if len(cols) != len(vals):
            raise ValueError(f"{len(cols)} columns but {len(vals)} values")
        self.cols = cols
        self.vals = vals

    def keys(self) -> tuple[str, ...]:
        return self.cols

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(self.cols, self.vals))


def _params(rows: list[Any], cols: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """Each row's values in ``cols`` order, converted where SQLite cannot bind them as they are."""
    if type(rows[0]) is _Values:
        params = [r.vals for r in rows]  # a run of them shares its columns, in this order
    elif len(cols) == 1:
        get = operator.itemgetter(*cols)
        params = [(get(r),) for r in rows]
    else:
        params = list(map(operator.itemgetter(*cols), rows))
    plain = _PLAIN.issuperset
    for k, p in enumerate(params):
        if not plain(map(type, p)):
            from sqlite_utils.db import jsonify_if_needed

            params[k] = tuple(jsonify_if_needed(v) for v in p)
    return params


def kv_table(namespace: str) -> str:
    """The table of a KV namespace: ``kv_<namespace>``; a name with characters a table name cannot hold
    gets them as ``_`` and a hash of the whole name, so ``team.a``, ``team-a`` and ``team_a`` stay apart."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", namespace)
    if safe != namespace:
        safe += "_" + hashlib.sha256(namespace.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return "kv_" + safe


class SQLiteKV(KV):
    """Bytes with a TTL in table ``kv_<namespace>`` of ``path``.

    Expired rows are skipped on read and swept every few hundred writes. With
    ``max_bytes``, the oldest-written entries are evicted once the namespace's
    keys plus values exceed it.
    """

    _SWEEP_EVERY = 256

    def __init__(self, path: Path, namespace: str, *, timeout_ms: int = 2000, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.table = kv_table(namespace)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._thread = _Thread("sluice-sqlite-kv", lambda: self._open(timeout_ms), timeout_ms / 1000)
        self._writes = 0

    def _open(self, timeout_ms: int) -> sqlite3.Connection:
        conn = connect(self.path, timeout_ms)

        def create() -> None:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} "
                "(key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL, size INTEGER NOT NULL, written REAL NOT NULL)"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {self.table}_written ON {self.table}(written)")

        retrying(create, timeout_ms)
        return conn

    async def get(self, key: str) -> bytes | None:
        def run(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(f"SELECT value, expires FROM {self.table} WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            if row[1] is not None and row[1] <= self._clock():
                conn.execute(f"DELETE FROM {self.table} WHERE key = ? AND expires <= ?", (key, self._clock()))
                return None
            return bytes(row[0])

        return await self._thread.run(run)

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._writes += 1
        sweep = self._writes % self._SWEEP_EVERY == 0

        def run(conn: sqlite3.Connection) -> None:
            now = self._clock()
            size = len(key.encode()) + len(value)
            if self.max_bytes is not None and size > self.max_bytes:
                # larger than the whole store: kept, it would evict every other entry, then itself (as in memory)
                conn.execute(f"DELETE FROM {self.table} WHERE key = ?", (key,))
                return
            conn.execute(
                f"INSERT OR REPLACE INTO {self.table} (key, value, expires, size, written) VALUES (?, ?, ?, ?, ?)",
                (key, bytes(value), None if ttl_s is None else now + ttl_s, size, now),
            )
            if sweep:
                conn.execute(f"DELETE FROM {self.table} WHERE expires <= ?", (now,))
            if self.max_bytes is not None:
                total = conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM {self.table}").fetchone()[0]
                if total > self.max_bytes:
                    self._evict(conn, total - self.max_bytes)

        await self._thread.run(run)

    def _evict(self, conn: sqlite3.Connection, excess: int) -> None:
        doomed: list[str] = []
        for k, size in conn.execute(f"SELECT key, size FROM {self.table} ORDER BY written"):
            if excess <= 0:
                break
            doomed.append(k)
            excess -= size
        conn.executemany(f"DELETE FROM {self.table} WHERE key = ?", [(k,) for k in doomed])

    async def delete(self, key: str) -> None:
        await self._thread.run(lambda conn: conn.execute(f"DELETE FROM {self.table} WHERE key = ?", (key,)))

    async def close(self) -> None:
        await asyncio.to_thread(self._thread.close)
