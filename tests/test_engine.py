"""The engine driven directly, without sockets: dispatch, policy, dedup and parking.

The engine is the real one (kvserve.engine.Engine over a real Store and the real
containers); only the loop around it is replaced, by sessions that record what they are sent
and a scheduler whose clock the test advances.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import pytest

from kvproto import schema
from kvproto.errors import NoSuchContainerError, ProtocolError, ReadOnlyError
from kvproto.wire import ERROR, RETURN
from kvserve.engine import Engine, Waiter
from kvserve.manager import KVManager
from kvserve.store import GENERAL, READ, WRITE


class FakeTimer:
    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at = at
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class FakeScheduler:
    """Timers that run when the test says time has passed."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for _ in range(1000):  # callbacks may schedule more; bounded
            due = [t for t in self.timers if t.at <= self.now and t.callback is not None]
            if not due:
                return
            timer = min(due, key=lambda t: t.at)
            callback, timer.callback = timer.callback, None
            assert callback is not None
            callback()
        raise AssertionError("timers kept scheduling timers")


class FakeSession:
    """A connection as the engine sees it: records late replies and resumes."""

    def __init__(self, readonly: bool = False) -> None:
        self.readonly = readonly
        self.caller = b"conn:%d" % id(self)
        self.parked: Waiter | None = None
        self.replies: list[tuple[str, Any]] = []
        self.resumed = 0

    def late_reply(self, kind: str, value: Any) -> None:
        self.replies.append((kind, value))

    def resume(self) -> None:
        self.resumed += 1


@pytest.fixture
def sched() -> FakeScheduler:
    return FakeScheduler()


@pytest.fixture
def engine(sched: FakeScheduler) -> Engine:
    return Engine(KVManager._registry, sched)


def create(engine: Engine, kind: str, name: str, *args: Any) -> None:
    kind_, value = reply(engine, FakeSession(), [None, "create", [kind, name, *args], None])
    assert kind_ == RETURN, value


def reply(engine: Engine, session: FakeSession, message: list[Any]) -> tuple[str, Any]:
    answer = engine.handle(session, message)
    assert answer is not None, "the call parked"
    return answer


def test_dispatch_through_the_method_table(engine: Engine) -> None:
    session = FakeSession()
    create(engine, "dict", "d")
    assert reply(engine, session, ["d", "__setitem__", ["k", "v"], None]) == (RETURN, None)
    assert reply(engine, session, ["d", "get", ["k"], None]) == (RETURN, "v")
    assert reply(engine, session, ["d", "get_many", [["k", "x"]], None])[1] == {"k": "v"}
    # The table entry is the schema's: one lookup gives the function and what the call is.
    function, op, path = engine.store.methods["d"]["incr"]
    assert path == WRITE
    assert op is schema.op("dict", "incr") and op.mutates
    assert function is not None and function.__name__ == "incr"
    # ...and the engine's path for it: plain reads and writes skip what they never need.
    paths = {name: entry[2] for name, entry in engine.store.methods["d"].items()}
    assert paths["__setitem__"] == WRITE
    assert paths["get"] == paths["__getitem__"] == paths["watch"] == READ
    assert paths["set"] == paths["renew"] == GENERAL  # now=, and renew is unwatched
    kind, exc = reply(engine, session, ["d", "no_such_method", [], None])
    assert kind == ERROR and isinstance(exc, AttributeError)
    kind, exc = reply(engine, session, ["nothing", "get", ["k"], None])
    assert kind == ERROR and isinstance(exc, NoSuchContainerError)
    kind, exc = reply(engine, session, ["d", "get", "not a list", None])
    assert kind == ERROR and isinstance(exc, ProtocolError)
    kind, exc = reply(engine, session, [1, 2, 3])
    assert kind == ERROR and isinstance(exc, ProtocolError)
    assert engine.ops_served == 7  # the create and six calls; the malformed one is not


def test_readonly_session_is_refused_a_mutation(engine: Engine) -> None:
    create(engine, "dict", "d")
    reply(engine, FakeSession(), ["d", "__setitem__", ["k", 1], None])
    ro = FakeSession(readonly=True)
    assert reply(engine, ro, ["d", "get", ["k"], None]) == (RETURN, 1)
    kind, exc = reply(engine, ro, ["d", "incr", ["k"], None, [b"ro-token", 1]])
    assert kind == ERROR and isinstance(exc, ReadOnlyError)
    kind, exc = reply(engine, ro, [None, "drop", ["d"], None])
    assert kind == ERROR and isinstance(exc, ReadOnlyError)
    kind, exc = reply(engine, ro, [None, "create", ["dict", "new"], None])
    assert kind == ERROR and isinstance(exc, ReadOnlyError)
    assert engine.store.objects["d"].state() == {"k": 1}
    assert b"ro-token" not in engine.sessions  # read-only answers are never remembered


def test_repeated_request_id_is_answered_not_applied(engine: Engine) -> None:
    session = FakeSession()
    create(engine, "dict", "d")
    incr = ["d", "incr", ["n"], None, [b"token-1", 7]]
    assert reply(engine, session, list(incr)) == (RETURN, 1)
    # The retry (after a lost connection, say) gets the first answer; the counter stays 1.
    assert reply(engine, FakeSession(), list(incr)) == (RETURN, 1)
    assert engine.store.objects["d"].state() == {"n": 1}
    kind, exc = reply(engine, session, ["d", "incr", ["n"], None, [b"token-1", 6]])
    assert kind == ERROR and "stale" in str(exc)
    assert reply(engine, session, ["d", "incr", ["n"], None, [b"token-1", 8]]) == (RETURN, 2)
    for bad in ([b"", 9], [b"token-1"], [b"token-1", "9"], "token-1"):
        kind, exc = reply(engine, session, ["d", "incr", ["n"], None, bad])
        assert kind == ERROR and "malformed request id" in str(exc)
    assert engine.store.objects["d"].state() == {"n": 2}
    # Reads are not remembered: their ids are dropped.
    reply(engine, session, ["d", "get", ["n"], None, [b"token-2", 1]])
    assert b"token-2" not in engine.sessions


def test_parked_get_is_answered_by_a_later_put(engine: Engine) -> None:
    create(engine, "queue", "q")
    getter, putter = FakeSession(), FakeSession()
    assert engine.handle(getter, ["q", "get", [True, None], None]) is None
    assert getter.parked is not None and getter.replies == []
    assert reply(engine, putter, ["q", "put", ["item", True, None], None]) == (RETURN, None)
    assert getter.replies == [(RETURN, "item")]
    assert getter.parked is None and getter.resumed == 1
    assert engine.parked == {}
    assert engine.store.objects["q"].size() == 0  # the item went to the waiter


def test_parked_gets_are_answered_in_arrival_order(engine: Engine) -> None:
    create(engine, "queue", "q")
    first, second = FakeSession(), FakeSession()
    assert engine.handle(first, ["q", "get", [True, None], None]) is None
    assert engine.handle(second, ["q", "get", [True, None], None]) is None
    reply(engine, FakeSession(), ["q", "put", [1, True, None], None])
    assert first.replies == [(RETURN, 1)] and second.replies == []
    reply(engine, FakeSession(), ["q", "put", [2, True, None], None])
    assert second.replies == [(RETURN, 2)]


def test_parked_get_times_out(engine: Engine, sched: FakeScheduler) -> None:
    create(engine, "queue", "q")
    getter = FakeSession()
    assert engine.handle(getter, ["q", "get", [True, 5.0], None, [b"tok", 1]]) is None
    sched.advance(4.9)
    assert getter.replies == []
    sched.advance(0.2)
    assert len(getter.replies) == 1
    kind, exc = getter.replies[0]
    assert kind == ERROR and isinstance(exc, queue.Empty)
    assert getter.parked is None and getter.resumed == 1 and engine.parked == {}
    assert engine.sessions[b"tok"][0] == 1  # the timeout is the remembered answer
    # A later put is not taken by the expired waiter.
    reply(engine, FakeSession(), ["q", "put", ["x", True, None], None])
    assert engine.store.objects["q"].size() == 1


def test_drop_answers_parked_waiters(engine: Engine, sched: FakeScheduler) -> None:
    create(engine, "queue", "q")
    getters = [FakeSession(), FakeSession()]
    for getter in getters:
        assert engine.handle(getter, ["q", "get", [True, 60.0], None]) is None
    assert reply(engine, FakeSession(), [None, "drop", ["q"], None]) == (RETURN, True)
    for getter in getters:
        [(kind, exc)] = getter.replies
        assert kind == ERROR and isinstance(exc, NoSuchContainerError)
        assert getter.parked is None
        assert getter.resumed == 0  # resumed from the loop, after the drop is answered
    sched.advance(0.0)
    assert [g.resumed for g in getters] == [1, 1]
    sched.advance(120.0)  # their timeouts were cancelled: no second answer
    assert [len(g.replies) for g in getters] == [1, 1]


def test_withdrawn_waiter_takes_nothing(engine: Engine) -> None:
    create(engine, "queue", "q")
    gone = FakeSession()
    assert engine.handle(gone, ["q", "get", [True, None], None]) is None
    engine.withdraw(gone)  # its connection closed
    reply(engine, FakeSession(), ["q", "put", ["x", True, None], None])
    assert gone.replies == [] and engine.store.objects["q"].size() == 1
