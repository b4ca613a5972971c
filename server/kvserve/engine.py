"""The engine: what kvserve does with a decoded request, with no I/O of its own (sans-IO).

It owns the store and everything a request does once it is decoded: dispatch through each
container's method table (:func:`kvserve.store.method_table`, built once per class from
:mod:`kvproto.schema`), the read-only policy, the request-id memory that answers a retried
call instead of applying it twice (the sessions table), parking of calls that would block
(``Queue.get`` on an empty queue) and their FIFO retry after each change, lease deadlines,
the persistence log appends, and the server-level functions (create, drop, batch, dump,
restore, compact, stats, ...).

It must not know about sockets, selectors, TLS, frames, buffers or time slicing: those are
:mod:`kvserve.server`'s (the loop). The loop gives the engine two things:

- a **session** per connection (:class:`Session`): whether it is read-only, who it is when a
  call carries no request id, and where answers that finish later go (a parked get answered
  after another client's put, a wait that timed out, a drop);
- a **scheduler** (:class:`Scheduler`): ``call_later(delay, callback)`` returning a handle
  with ``cancel()``; the engine asks for timers through it and never sleeps.

:meth:`Engine.handle` takes one decoded request and returns its reply ``(kind, value)``, or
None when the call is parked: its answer then goes to the session's :meth:`Session.late_reply`,
followed by :meth:`Session.resume` so the loop handles the requests that waited behind it.
"""

from __future__ import annotations

import collections
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from kvproto import schema
from kvproto._version import __version__
from kvproto.errors import NoSuchContainerError, ProtocolError, ReadOnlyError
from kvproto.wire import (
    ERROR,
    MAX_BATCH,
    MAX_METHOD,
    MAX_NAME,
    RETURN,
    RID_TOKEN_MAX,
    check_args,
    parse_request,
)
from kvserve.containers import MAX_TIMEOUT, Container, WouldBlock
from kvserve.counters import Counters
from kvserve.dumps import Dumps, restore_records
from kvserve.persistence import LoadReport, Persistence, dump_state, restore_state
from kvserve.store import GENERAL, READ, WRITE, Method, MethodTable, Registry, Store

__all__ = ["Engine", "Handle", "Scheduler", "Session", "Waiter", "scrub"]

# Server-level calls by what the schema says of them (kvproto.schema).
_LOGGED_PUBLIC: Final = frozenset(
    name for name, op in schema.SERVER.items() if op.is_logged and not op.own_policy
)
_WRITE_PUBLIC: Final = frozenset(
    name for name, op in schema.SERVER.items() if op.mutates and not op.own_policy
)
_REMEMBERED_PUBLIC: Final = frozenset(name for name, op in schema.SERVER.items() if op.mutates)
# Server-level calls on state the calling connection owns (kvproto.schema.Op.session).
_SESSION_CALLS: Final = frozenset(m for m, op in schema.SERVER.items() if op.session)
# Request-id memory: one last answer per client thread. Not Final, which mypyc (the optional
# compiled build) would inline: tests lower it (tests/test_attach_keeps_retry_memory.py).
_MAX_SESSIONS: int = 65536


class Handle(Protocol):
    """A scheduled callback, as the scheduler returns it."""

    def cancel(self) -> None:
        """Make the callback a no-op (and free what it holds)."""


class Scheduler(Protocol):
    """What the engine needs of the loop's timers."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Handle:
        """Run ``callback`` after ``delay`` seconds (finite, >= 0), from the loop."""


class Session(Protocol):
    """One client connection as the engine sees it.

    Attributes:
        readonly: authenticated with the read-only key: every mutation is refused.
        caller: who the connection is for calls without a request id (``caller=`` of the
            ownership methods); a request id's session token takes its place when present.
        parked: the call of this session parked in the engine, if any (set and cleared by
            the engine; the loop reads no frames of a session while it is set).
    """

    readonly: bool
    caller: bytes
    parked: Waiter | None

    def late_reply(self, kind: str, value: Any) -> None:
        """Send the answer to this session's parked call (``kind`` is RETURN or ERROR)."""

    def resume(self) -> None:
        """Handle the requests that waited behind the parked call just answered."""


class Waiter:
    """A parked request: who asked, what, and until when."""

    __slots__ = ("blocked", "done", "message", "name", "rid", "session", "timer")

    def __init__(
        self,
        session: Session,
        name: str,
        message: list[Any],
        blocked: WouldBlock,
        rid: list[Any] | None,
    ) -> None:
        self.session = session
        self.name = name
        self.message = message
        self.blocked = blocked
        self.rid = rid
        self.done = False
        self.timer: Handle | None = None


class Engine:
    """The store and everything a decoded request does to it (see the module docstring).

    Args:
        registry: the manager's typeid registry (what kinds exist).
        scheduler: the loop's timers.
        persistence: keep the data on disk (opened here, which loads it); None: memory only.
        counters: where the loop and the engine count requests, errors, bytes and lease
            expiries, and keep the slow-request log (``kvctl slowlog``); None: new ones
            with no slow-request log.
        history: ``(count, age in seconds)`` of the changes each container keeps for
            ``watch``; None: :mod:`kvserve.history`'s defaults.
    """

    def __init__(
        self,
        registry: Registry,
        scheduler: Scheduler,
        persistence: Persistence | None = None,
        counters: Counters | None = None,
        history: tuple[int, float] | None = None,
    ) -> None:
        self.store = Store(registry) if history is None else Store(registry, history)
        self._calls = self.store.calls  # looked up on every call
        self.scheduler = scheduler
        self.persist = persistence
        self.started = time.time()
        self.requests_served = 0  # request frames
        self.batched_ops = 0  # the calls of batches beyond one per batch (see ops_served)
        self.counters = Counters() if counters is None else counters
        # Facts about connections for stats(), from the loop: {"clients": n, ...}.
        self.connection_stats: Callable[[], dict[str, Any]] = dict
        # token -> (seq, kind, value) of each client session's last answered request.
        self.sessions: dict[bytes, tuple[int, str, Any]] = {}
        self.parked: dict[str, collections.deque[Waiter]] = {}
        # container name -> (when, timer) of its next expire() (leases)
        self._deadlines: dict[str, tuple[float, Handle]] = {}
        self.load_report: LoadReport | None = None
        self.dumps = Dumps()  # dumps read in pieces (kvserve.dumps)
        if persistence is not None:
            # Set before open(): a repair at start-up writes a snapshot too.
            persistence.answered = self._answered_ids
            self.load_report = persistence.open(self.store, self.remember)
        self._public: dict[str, Callable[..., Any]] = {
            "create": self._create,
            "names": self.store.names,
            "describe": self.store.describe,
            "drop": self._drop,
            "ping": lambda: None,
            "stats": self.stats,
            "slowlog": self.counters.read_slowlog,
            "get_methods": self._get_methods,
            "number_of_objects": lambda: len(self.store.objects),
            "compact": self._compact,
            "dump": lambda: dump_state(self.store),
            "restore": self._restore,
            "restore_part": self._restore_part,
        }

    @property
    def ops_served(self) -> int:
        """Operations served, counting each call of a batch."""
        return self.requests_served + self.batched_ops

    def start(self) -> None:
        """Schedule the deadlines of what was loaded from disk (leases run out on time too)."""
        self._schedule_deadlines()

    # -- requests ------------------------------------------------------------------------

    def handle(
        self, session: Session, message: Any, raw: bytes | memoryview | None = None
    ) -> tuple[str, Any] | None:
        """Apply one decoded request; return its reply ``(kind, value)``, None if parked.

        Args:
            session: who sent it.
            message: the decoded request, ``[ident, method, args, kwds(, rid)]`` (it is
                checked here; a request id is popped off it).
            raw: the request's encoded bytes, logged as they are when the call needs no
                rewriting (saves packing it again); None: pack the message.

        Every failure of the call is in the reply; an exception from here is a bug.
        """
        size = len(message) if type(message) is list else 0
        if 3 < size < 6:
            # The common call, a plain READ or WRITE of an existing container (store.Method)
            # with positional args and no keywords: one lookup, then what the general path
            # below and _invoke do for it, inline and in the same order, without the steps
            # such a call never needs. Anything else takes the general path.
            try:
                target, table = self._calls[message[0]]
                function, op, path = table[message[1]]
            except (KeyError, TypeError):
                path = GENERAL
            args = message[2]
            if (
                path
                and type(args) is list
                and message[3] is None
                and (path == READ or not session.readonly)
            ):
                rid = None
                if size == 5:
                    # parse_request and valid_rid, inline.
                    rid = message[4]
                    if type(rid) is not list or len(rid) != 2:
                        return ERROR, ProtocolError("malformed request id")
                    token, seq = rid
                    if type(token) is not bytes or type(seq) is not int:
                        return ERROR, ProtocolError("malformed request id")
                    if not 0 < len(token) <= RID_TOKEN_MAX:
                        return ERROR, ProtocolError("malformed request id")
                    del message[4]
                self.requests_served += 1
                if rid is not None:
                    if path == READ:
                        rid = None  # it changes nothing: not remembered (see below)
                    else:
                        last = self.sessions.get(token)
                        if last is not None and last[0] >= seq:
                            return self._answered(rid)
                ident = message[0]
                try:
                    # Positional calls for the usual counts: no args tuple (CALL_FUNCTION_EX).
                    if len(args) == 1:
                        result = function(target, args[0])  # type: ignore[misc]
                    elif len(args) == 2:
                        result = function(target, args[0], args[1])  # type: ignore[misc]
                    else:
                        result = function(target, *args)  # type: ignore[misc]
                except Exception as exc:
                    try:
                        self._applied(target, op, message, rid, raw, None, exc)
                    except Exception as other:  # journaling or logging it failed
                        exc = other
                    return self._failure(session, message, rid, exc)
                try:
                    if target.journal:
                        self._log_journal(ident, target)
                    if path == WRITE:
                        history = target.history
                        if history is not None:
                            # History.record, inlined: every write's cost of watch (a call
                            # would double it; callgrind, bench/results/*-watch-engine.md).
                            history.revision = rev = history.revision + 1
                            history.entries.append((rev, message[1], args, None, result))
                        if self.persist is not None:
                            self._log_request(op, message, rid, raw)
                except Exception as exc:
                    return self._failure(session, message, rid, exc)
                if rid is not None:  # a WRITE's: remember(), inline
                    sessions = self.sessions
                    sessions.pop(token, None)
                    sessions[token] = (seq, RETURN, result)
                    if len(sessions) > _MAX_SESSIONS:
                        del sessions[next(iter(sessions))]
                if ident in self.parked:
                    self._retry_parked(ident)
                return RETURN, result
        if (
            type(message) is list
            and len(message) == 4
            and type(message[0]) is str
            and type(message[1]) is str
            and len(message[0]) <= MAX_NAME
            and len(message[1]) <= MAX_METHOD
        ):
            rid = None  # a container call without a request id: parse_request's checks, inline
        else:
            try:
                rid = parse_request(message)
            except ProtocolError as exc:
                return ERROR, exc
        ident, method = message[0], message[1]
        self.requests_served += 1
        if ident is None:
            return self._handle_public(session, message, rid)
        obj = self.store.objects.get(ident)
        entry = None if obj is None else self.store.methods[ident].get(method)
        if rid is not None:
            if entry is not None:
                keep = not session.readonly and (entry[1].mutates or entry[1].caller)
            else:
                # Unknown container or method: the call fails; keep the id of what could
                # change state so its error is remembered too.
                keep = not session.readonly and (
                    obj is None or method in obj.mutating or method in obj.caller_methods
                )
            if not keep:
                # Calls that change nothing are safe to retry without an id: remembering
                # their answers would pin them (a copy() of a big list per id) and let a
                # stream of pings evict other sessions' answers, so a retried incr ran
                # twice. The read-only key must not read or evict other sessions' answers.
                rid = None
            else:
                cached = self._answered(rid)
                if cached is not None:
                    return cached
        try:
            if entry is None:
                self._lookup(ident, method)  # raises what is missing
            assert obj is not None and entry is not None
            result = self._invoke(obj, entry, message, rid, session, raw)
        except Exception as exc:
            return self._failure(session, message, rid, exc)
        if rid is not None:
            self.remember(rid[0], rid[1], RETURN, result)
        if ident in self.parked:
            self._retry_parked(ident)
        return RETURN, result

    def _failure(
        self, session: Session, message: list[Any], rid: list[Any] | None, exc: Exception
    ) -> tuple[str, Any] | None:
        """Park a call that would block, or answer (and remember) the error it raised."""
        if isinstance(exc, WouldBlock):
            return self._park(session, message, exc, rid)
        scrub(exc)
        if rid is not None:
            self.remember(rid[0], rid[1], ERROR, exc)
        return ERROR, exc

    def _handle_public(
        self, session: Session, message: list[Any], rid: list[Any] | None
    ) -> tuple[str, Any] | None:
        method = message[1]
        if rid is not None and (session.readonly or method not in _REMEMBERED_PUBLIC):
            rid = None  # as for container calls (see handle)
        if rid is not None:
            cached = self._answered(rid)
            if cached is not None:
                return cached
        try:
            result = self._call_public(session, message, rid)
        except Exception as exc:  # no server-level call blocks; _failure would park one
            return self._failure(session, message, rid, exc)
        if rid is not None:
            self.remember(rid[0], rid[1], RETURN, result)
        return RETURN, result

    def _answered(self, rid: list[Any]) -> tuple[str, Any] | None:
        """Return the reply to give a request id seen before: its first answer, or stale."""
        cached = self.sessions.get(rid[0])
        if cached is None or cached[0] < rid[1]:
            return None
        if cached[0] == rid[1]:
            # A retry of a call that was already applied: answer it, do not apply it again.
            return cached[1], cached[2]
        return ERROR, ProtocolError("stale request id")

    def _answered_ids(self) -> list[list[Any]]:
        """Return ``[[token, seq], ...]`` of every remembered answer (for a snapshot)."""
        return [[token, entry[0]] for token, entry in self.sessions.items()]

    def remember(self, token: bytes, seq: int, kind: str, value: Any) -> None:
        """Record the answer to request ``seq`` of session ``token`` (for retries)."""
        sessions = self.sessions
        sessions.pop(token, None)  # re-insert: the dict's order is least recently used first
        sessions[token] = (seq, kind, value)
        if len(sessions) > _MAX_SESSIONS:
            del sessions[next(iter(sessions))]

    def _late_answer(self, session: Session, rid: list[Any] | None, kind: str, value: Any) -> None:
        if kind == ERROR and isinstance(value, BaseException):
            scrub(value)
        if rid is not None:
            self.remember(rid[0], rid[1], kind, value)
        session.late_reply(kind, value)

    def _lookup(self, ident: Any, method: str) -> tuple[Container, MethodTable]:
        """Return the container called ``ident`` and its method table, checking ``method``.

        Raises:
            NoSuchContainerError: no such container.
            AttributeError: it has no such method on the wire.
        """
        obj = self.store.get(ident)
        table = self.store.methods[ident]
        if method not in table:
            raise AttributeError(f"{obj.kind} {ident!r} has no method {method!r}")
        return obj, table

    def _call(
        self,
        message: list[Any],
        rid: list[Any] | None,
        session: Session,
        raw: bytes | memoryview | None = None,
    ) -> Any:
        obj, table = self._lookup(message[0], message[1])
        return self._invoke(obj, table[message[1]], message, rid, session, raw)

    def _invoke(
        self,
        obj: Container,
        entry: Method,
        message: list[Any],
        rid: list[Any] | None,
        session: Session,
        raw: bytes | memoryview | None,
    ) -> Any:
        """Check and run one container call, then log it (see the comments for the order)."""
        ident, method, args, kwds = message
        function, op, _ = entry
        if (type(args) is not list and type(args) is not tuple) or (
            kwds is not None and type(kwds) is not dict
        ):
            check_args(args, kwds)  # inline above for speed; this raises what is wrong
        if op.mutates and session.readonly:
            raise ReadOnlyError(
                f"this connection authenticated with the read-only key; {method!r} on "
                f"{ident!r} would change it"
            )
        if op.caller:
            # The session token when the call has a request id (stable across reconnects),
            # else the connection. Put into the message, so the log replays the same owner
            # (and a parked call, retried, finds it there already).
            caller = rid[0] if rid is not None else session.caller
            if kwds and kwds.get("caller", caller) != caller:
                raise ProtocolError("'caller' is set by the server, not the client")
            kwds = message[3] = {**(kwds or {}), "caller": caller}
        if op.clock:
            # A deadline from the server's wall clock, logged with the call (as caller= is):
            # a replay computes the same one, and a restart never extends a TTL.
            if kwds and "now" in kwds:
                raise ProtocolError("'now' is set by the server, not the client")
            kwds = message[3] = {**(kwds or {}), "now": time.time()}
        # No lock: only the loop thread calls containers, one call at a time, so each call
        # is atomic without one (the compactor and dumps copy them from this thread first).
        try:
            if function is None:
                bound = getattr(obj, method)
                result = bound(*args, **kwds) if kwds else bound(*args)
            else:
                result = function(obj, *args, **kwds) if kwds else function(obj, *args)
        except Exception as exc:
            self._applied(obj, op, message, rid, raw, None, exc)
            raise
        self._applied(obj, op, message, rid, raw, result, None)
        return result

    def _applied(
        self,
        obj: Container,
        op: schema.Op,
        message: list[Any],
        rid: list[Any] | None,
        raw: bytes | memoryview | None,
        result: Any,
        failed: Exception | None,
    ) -> None:
        """Journal, record, log and schedule what one call did (``failed``: what it raised).

        A call that would block (:class:`WouldBlock`) was not applied: it is logged when a
        retry completes it. A mutating call may raise halfway (delete_many(["a", ["x"]])
        deletes "a", then fails on the list; sort() of mixed types leaves the list
        reordered): it is logged all the same, since replay raises the same way at the same
        point, so memory and the log never disagree. (Validating everything first would have
        to be done, and kept right, in every method.)
        """
        ident = message[0]
        if obj.journal:
            self._log_journal(ident, obj)
        if isinstance(failed, WouldBlock):
            return
        if op.mutates:
            history = obj.history
            if history is not None and failed is None and not op.unwatched:
                history.record(message[1], message[2], message[3], result)
            if self.persist is not None:
                self._log_request(op, message, rid, raw)
            if obj.timed or op.clock:
                self._schedule_deadline(ident, obj)

    def _log_request(
        self,
        op: schema.Op,
        message: list[Any],
        rid: list[Any] | None,
        raw: bytes | memoryview | None,
    ) -> None:
        """Append one applied container call to the log."""
        assert self.persist is not None
        if raw is not None and not (op.caller or op.clock):
            # The frame as received is already the record, [name, method, args, kwds(, rid)]:
            # log its bytes rather than pack the same list again.
            self.persist.append_encoded(raw)
        else:
            self.persist.append(message if rid is None else [*message, rid])

    def _log_journal(self, name: str, obj: Container) -> None:
        entries, obj.journal = obj.journal, []
        # Every journaled change is a lease running out (evict, evict_waiter) so far.
        self.counters.lease_expiries += sum(1 for e in entries if e[0].startswith("evict"))
        history = obj.history
        if history is not None:
            for method, args in entries:  # a change by the clock (an expired key) is one too
                history.record(method, args, None, None)
        if self.persist is not None:
            for method, args in entries:
                self.persist.append([name, method, args, None])

    def _call_public(self, session: Session, message: list[Any], rid: list[Any] | None) -> Any:
        _, method, args, kwds = message
        check_args(args, kwds)
        if method == "batch":
            return self._batch(args, rid, session)
        if method in schema.STDLIB_NOOPS:
            return None
        if method in _SESSION_CALLS:
            return self._session_call(session, method, args, kwds)
        func = self._public.get(method)
        if func is None:
            raise AttributeError(f"kvserve has no function {method!r}")
        if method == "create":
            return self._create_request(session, message, rid)
        if session.readonly and method in _WRITE_PUBLIC:
            raise ReadOnlyError(
                "this connection authenticated with the read-only key; "
                f"{method!r} would change the server"
            )
        result = func(*args, **(kwds or {}))
        if self.persist is not None and method in _LOGGED_PUBLIC:
            self.persist.append(message if rid is None else [*message, rid])
        return result

    def _create_request(self, session: Session, message: list[Any], rid: list[Any] | None) -> Any:
        """Attach to a container, creating it first if needed (and allowed).

        The kind and name are taken the way Python binds ``create(kind, name, *args,
        **kwds)``, positional or keyword, so no spelling of the request skips a check. Only a
        call that creates something is logged: attaching changes nothing.
        """
        _, _, args, kwds = message
        rest = list(args)
        options = dict(kwds or {})
        kind = rest.pop(0) if rest else options.pop("kind", None)
        name = rest.pop(0) if rest else options.pop("name", None)
        existing = self.store.objects.get(name) if type(name) is str else None
        if existing is None and session.readonly:
            raise ReadOnlyError(
                "this connection authenticated with the read-only key; creating "
                f"{name!r} would change the server"
            )
        if type(kind) is not str or len(kind) > MAX_METHOD:
            raise TypeError(f"the container kind must be a str of at most {MAX_METHOD} chars")
        result = self._create(kind, name, *rest, **options)
        if existing is None and self.persist is not None:
            record = [None, "create", [kind, name, *rest], options]
            self.persist.append(record if rid is None else [*record, rid])
        return result

    def _batch(self, args: list[Any], rid: list[Any] | None, session: Session) -> list[list[Any]]:
        if len(args) != 1 or type(args[0]) is not list:
            raise ProtocolError("malformed batch: expected one array of requests")
        if len(args[0]) > MAX_BATCH:
            # One batch runs in one loop turn: 4M entries held every other client 4.9 s.
            raise ProtocolError(f"a batch holds at most {MAX_BATCH} calls (kvclient splits them)")
        results: list[list[Any]] = []
        touched: set[str] = set()
        for index, message in enumerate(args[0]):
            if type(message) is not list or not 4 <= len(message) <= 5 or message[0] is None:
                results.append([ERROR, ProtocolError("malformed request in batch")])
                continue
            del message[4:]  # the batch's own request id covers its calls
            sub_rid = None if rid is None else [rid[0], rid[1], index]
            try:
                results.append([RETURN, self._call(message, sub_rid, session)])
                touched.add(message[0])
            except WouldBlock as wb:  # a batch never waits
                if wb.on_timeout is not None:
                    results.append([ERROR, wb.on_timeout])
                else:
                    results.append([RETURN, wb.result])
            except Exception as exc:
                scrub(exc)
                results.append([ERROR, exc])
        self.batched_ops += len(results) - 1
        for name in touched & self.parked.keys():
            self._retry_parked(name)
        return results

    # -- server-level functions ----------------------------------------------------------

    def _create(self, kind: str, name: str, *args: Any, **kwds: Any) -> list[Any]:
        self.store.create(kind, name, *args, **kwds)
        return [name, sorted(self.store.exposed[name])]

    def _get_methods(self, token: Any) -> list[str]:
        name = token[-1] if isinstance(token, list | tuple) else token
        self.store.get(name)
        return sorted(self.store.exposed[name])

    def _drop(self, name: str) -> bool:
        existed = self.store.drop(name)
        for waiter in self.parked.pop(name, ()):
            self._finish(waiter)
            waiter.session.parked = None
            waiter.session.late_reply(
                ERROR, NoSuchContainerError(f"container {name!r} was dropped")
            )
            # Its next requests wait until the drop is logged (after this returns): run now,
            # a write to the re-created container would be logged before the drop, and a
            # restart would replay the drop over an acknowledged write.
            self.scheduler.call_later(0.0, waiter.session.resume)
        return existed

    def _compact(self) -> bool:
        if self.persist is None:
            raise ValueError("this server keeps no data on disk (start it with --data-dir)")
        # compact() flushes first: records queued in this iteration belong to the segments
        # the snapshot covers. If that flush fails they stay queued, this call fails, and
        # the durability policy stops the server before any of their replies is sent.
        return self.persist.compact(self.store)

    def _restore(self, dump: Any) -> int:
        count = restore_state(self.store, dump)
        self._schedule_deadlines()
        return count

    def _restore_part(self, records: Any, first: Any = False) -> int:
        count, names = restore_records(self.store, records, first)
        for name in names:
            obj = self.store.objects[name]
            if type(obj).next_deadline is not Container.next_deadline:
                self._schedule_deadline(name, obj)
        return count

    def _session_call(
        self, session: Session, method: str, args: list[Any], kwds: dict[str, Any] | None
    ) -> Any:
        """The dump cursor calls: they belong to the connection that opened them."""
        if kwds:
            raise TypeError(f"{method}() takes no keyword arguments")
        if method == "dump_open":
            if args:
                raise TypeError("dump_open() takes no arguments")
            return self.dumps.open(session, self.store)
        if len(args) != 1:
            raise TypeError(f"{method}() takes one argument, the cursor")
        if method == "dump_next":
            return self.dumps.next(session, args[0])
        return self.dumps.close(session, args[0])

    def forget(self, session: Session) -> None:
        """Drop what a connection that went away held: its parked call, its dump cursors."""
        if session.parked is not None:
            self.withdraw(session)
        self.dumps.forget(session)

    def stats(self) -> dict[str, Any]:
        """Return server facts for ``kvctl stats`` and ``kvctl top`` (``Client.stats()``).

        Counts are since start; a reader makes rates from two replies.

        - ``version``; ``uptime``: seconds.
        - ``clients``: authenticated connections now; ``refused_connections``: since start.
        - ``containers``; ``keys``: items held in all of them.
        - ``ops``: calls served, each call of a batch counted; ``requests``: request frames
          answered (a batch is one).
        - ``memory``: ``rss_bytes``, the server process's resident memory now (None where
          the OS does not say), and ``peak_rss_bytes``.
        - ``requests_by_op``: ``{"kind.op": {"count": n, "seconds": s}}``, the requests
          handled by kind and operation (``server.batch`` for a batch) and the seconds they
          took in all; None unless the server times requests (``--metrics``, ``--slow-ms``).
        - ``persistence``: None without ``--data-dir``; else ``data_dir``, ``fsync``,
          ``disk_bytes``, ``compactions``, ``compacting``, ``compaction_failures``,
          ``last_error``, and ``fsyncs`` and ``fsync_seconds``: the fdatasyncs of the log
          and the seconds they took in all.
        """
        objects = list(self.store.objects.values())
        connections = self.connection_stats()
        persist = self.persist
        return {
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "clients": connections.get("clients", 0),
            "containers": len(objects),
            "keys": sum(obj.size() for obj in objects),
            "refused_connections": connections.get("refused_connections", 0),
            "ops": self.ops_served,
            "requests": self.requests_served,
            "memory": _memory(),
            "requests_by_op": self.counters.by_operation(),
            "persistence": None
            if persist is None
            else {
                "data_dir": str(persist.dir),
                "fsync": persist.fsync,
                "disk_bytes": persist.disk_bytes(),
                "compactions": persist.compactions,
                "compacting": persist.compacting,
                "compaction_failures": persist.compaction_failures,
                "last_error": persist.last_error,
                "fsyncs": persist.fsync_times.count,
                "fsync_seconds": round(persist.fsync_times.total, 6),
            },
        }

    # -- deadlines -----------------------------------------------------------------------

    def _schedule_deadlines(self) -> None:
        """Ask every container that uses timers when it next needs one (start-up, restore)."""
        for name, obj in list(self.store.objects.items()):
            self._schedule_deadline(name, obj)

    def _schedule_deadline(self, name: str, obj: Container) -> None:
        at = obj.next_deadline()
        if at is None:
            return
        scheduled = self._deadlines.get(name)
        if scheduled is not None:
            if scheduled[0] <= at:
                return  # an earlier timer will run and reschedule
            scheduled[1].cancel()  # superseded: do not let them pile up
        # Containers keep time by time.monotonic() (leases): so does this delay.
        handle = self.scheduler.call_later(
            max(0.0, at - time.monotonic()), lambda: self._on_deadline(name)
        )
        self._deadlines[name] = (at, handle)

    def _on_deadline(self, name: str) -> None:
        del self._deadlines[name]
        obj = self.store.objects.get(name)
        if obj is None:
            return
        obj.expire(time.monotonic())
        if obj.journal:
            self._log_journal(name, obj)
        if name in self.parked:
            self._retry_parked(name)
        self._schedule_deadline(name, obj)

    # -- parking -------------------------------------------------------------------------

    def _park(
        self, session: Session, message: list[Any], wb: WouldBlock, rid: list[Any] | None
    ) -> tuple[str, Any] | None:
        name = message[0]
        scrub(wb)
        if wb.timeout is not None and not 0 <= wb.timeout <= MAX_TIMEOUT:
            # Every kind checks its timeouts with check_timeout(); this guards the loop
            # against one that forgot (a bad timeout must never reach the timer heap).
            exc = ValueError(f"bad timeout {wb.timeout!r}")
            if rid is not None:
                self.remember(rid[0], rid[1], ERROR, exc)
            return ERROR, exc
        waiter = Waiter(session, name, message, wb, rid)
        session.parked = waiter
        self.parked.setdefault(name, collections.deque()).append(waiter)
        if wb.timeout is not None:
            waiter.timer = self.scheduler.call_later(wb.timeout, lambda: self._expire(waiter))
        return None

    def withdraw(self, session: Session) -> None:
        """Forget the parked call of a session that went away (it must not take an item)."""
        waiter = session.parked
        if waiter is None:
            return
        self._finish(waiter)
        session.parked = None
        queue = self.parked.get(waiter.name)
        if queue is not None:
            try:
                queue.remove(waiter)
            except ValueError:
                pass
            if not queue:
                del self.parked[waiter.name]
        withdrawn = waiter.blocked.on_withdraw
        obj = self.store.objects.get(waiter.name)
        if withdrawn is not None and obj is not None:
            withdrawn()

    def stop_waiters(self, error: BaseException) -> None:
        """Answer every parked call with ``error`` (shutting down)."""
        for name in list(self.parked):
            for waiter in self.parked.pop(name):
                self._finish(waiter)
                waiter.session.parked = None
                waiter.session.late_reply(ERROR, error)

    def _finish(self, waiter: Waiter) -> None:
        """Mark a parked call answered or withdrawn, and cancel its timeout."""
        waiter.done = True
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None

    def _expire(self, waiter: Waiter) -> None:
        if waiter.done:
            return
        self._finish(waiter)
        queue = self.parked.get(waiter.name)
        if queue is not None:
            queue.remove(waiter)
            if not queue:
                del self.parked[waiter.name]
        session = waiter.session
        session.parked = None
        wb = waiter.blocked
        if wb.on_expire is not None:
            obj = self.store.objects.get(waiter.name)
            if obj is not None:
                wb.on_expire()
        if wb.on_timeout is not None:
            self._late_answer(session, waiter.rid, ERROR, wb.on_timeout)
        else:
            self._late_answer(session, waiter.rid, RETURN, wb.result)
        if wb.on_expire is not None and waiter.name in self.parked:
            self._retry_parked(waiter.name)
        session.resume()

    def _retry_parked(self, name: str) -> None:
        """Retry the requests parked on ``name`` in arrival order, answering those that finish.

        A container with ``strict_fifo`` stops at the first request that still blocks, so no
        later one overtakes it; the others retry every parked request. Answered requests may
        change the container again (a get frees room for a put), so this loops until a whole
        pass answers nothing.
        """
        queue = self.parked.get(name)
        obj = self.store.objects.get(name)
        strict = obj.strict_fifo if obj is not None else True
        resumed: list[Session] = []
        progress = True
        while queue and progress:
            progress = False
            held = False  # a strict line stopped: only waits outside the line are retried
            for waiter in list(queue):
                if held and waiter.blocked.in_line:
                    continue
                cached = self.sessions.get(waiter.rid[0]) if waiter.rid else None
                if cached is not None and waiter.rid is not None and cached[0] == waiter.rid[1]:
                    # The same request parked twice (a retry arrived before the server saw
                    # the first connection die): the first was answered; repeat that answer.
                    waiter.session.late_reply(cached[1], cached[2])
                else:
                    try:
                        result = self._call(waiter.message, waiter.rid, waiter.session)
                    except WouldBlock as again:
                        if again.resume is not None:
                            waiter.message = _resumed(waiter.message, again.resume)
                            waiter.blocked.result = again.result  # its timeout answer too
                        if strict and again.in_line:
                            held = True  # a watch parked behind it still sees the change
                        continue
                    except Exception as exc:
                        self._late_answer(waiter.session, waiter.rid, ERROR, exc)
                    else:
                        self._late_answer(waiter.session, waiter.rid, RETURN, result)
                queue.remove(waiter)
                self._finish(waiter)
                waiter.session.parked = None
                resumed.append(waiter.session)
                progress = True
        if queue is not None and not queue:
            self.parked.pop(name, None)
        for session in resumed:
            session.resume()


def _resumed(message: list[Any], resume: tuple[int, str, Any]) -> list[Any]:
    """Return a parked call's ``message`` with one argument replaced (``WouldBlock.resume``)."""
    ident, method, args, kwds = message
    position, name, value = resume
    if kwds and name in kwds:
        kwds = {**kwds, name: value}
    elif position < len(args):
        args = [*args[:position], value, *args[position + 1 :]]
    else:
        kwds = {**(kwds or {}), name: value}
    return [ident, method, args, kwds]


def scrub(exc: BaseException) -> None:
    """Drop the traceback and chained exceptions of an exception the server keeps.

    Answers are remembered for retries and parked calls keep their WouldBlock: a traceback
    would keep every frame's locals alive with them, among them views of the connection's
    receive buffer (which then cannot be resized: BufferError) and whole request payloads.
    """
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None


def _memory() -> dict[str, int | None]:
    """Return this process's resident memory now and at its peak, bytes."""
    # ru_maxrss is KiB on Linux and bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024
    try:
        with open("/proc/self/statm", "rb") as fh:
            rss: int | None = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = None  # not Linux
    # statm and getrusage count a little differently: a peak below the current size would
    # read as a bug.
    return {"rss_bytes": rss, "peak_rss_bytes": peak if rss is None else max(peak, rss)}
