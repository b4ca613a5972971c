"""What a proxy calls through (a :class:`Runner`), what a call is, and the sync flow driver.

A proxy knows its kind, its name and its runner, nothing else. A runner executes one call
(:meth:`Runner.call`) or a whole multi-step flow (:meth:`Runner.run`); the kvserve socket
client (:class:`~kvclient.client.Client`, over :class:`~kvclient._backend.SocketBackend`) is
one runner, a :class:`~kvclient.client.Batch` recording calls is another.

Every call names its kind, so the runner derives what it needs from :mod:`kvproto.schema`
instead of a hand-kept list of method names (:func:`plan`): a call that mutates carries a
request id (safe to retry), and a blocking one waits for its reply as long as its own wait
plus the call timeout (:func:`reply_timeout`).

A multi-step flow (Lock.acquire with its lease tracking, Condition.wait, Barrier.wait; see
:mod:`kvclient._flows`) is a generator that yields :class:`Call` descriptions and is sent
each result (or thrown each exception), so it is written once, with no I/O in it.
:func:`run_sync` drives one over a blocking runner; an asyncio front end drives the same
generators with ``await``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Generator
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from kvclient._leases import LeaseKeeper
from kvproto import schema
from kvproto._mypyc import mypyc_attr
from kvproto.schema import Op

__all__ = [
    "DERIVED",
    "PLANS",
    "Call",
    "Flow",
    "RequestIds",
    "Runner",
    "plan",
    "plan_of",
    "reply_timeout",
    "run_sync",
]

_T = TypeVar("_T")

DERIVED: Final[Any] = object()
"""``timeout=`` default of :meth:`Runner.call`: derive the reply timeout from the schema."""

# A method the schema does not know gets a request id, as a mutating call: the server
# refuses it anyway, and nothing unknown is ever retried without one.
_UNKNOWN: Final = Op(mutates=True)
# kind -> method -> None for a plain read (no request id, the usual reply timeout), else its
# Op. Filled on first use of each (kind, method) from kvproto.schema.
PLANS: dict[str | None, dict[str, Op | None]] = {}


def plan(kind: str | None, method: str) -> Op | None:
    """Return what a runner must know of ``method`` on ``kind``: None for a plain read.

    A plain read neither needs a request id (it does not mutate, or mutates idempotently,
    as get-or-create does) nor blocks: it goes without an id and with the usual reply
    timeout. Anything else is returned as its :class:`~kvproto.schema.Op`; a method the
    schema does not know counts as mutating. Cached: the hot path is ``PLANS[kind][method]``.
    """
    op = schema.op(kind, method) or _UNKNOWN
    found = None if not (op.needs_id or op.blocks) else op
    PLANS.setdefault(kind, {})[method] = found
    return found


def plan_of(kind: str | None, method: str) -> Op | None:
    """Return :func:`plan` of ``method`` on ``kind``, from :data:`PLANS` once it is there.

    The one lookup every runner makes before a call. The sync socket backend's per-call path
    writes the same two lookups inline, to save this function call.
    """
    try:
        return PLANS[kind][method]
    except KeyError:
        return plan(kind, method)


@mypyc_attr(allow_interpreted_subclasses=True)  # the socket backends' sessions extend it
class RequestIds:
    """A request-id session: a random token and a sequence number, kept across reconnects.

    The socket backends give every call that needs one (``Op.needs_id``) the next id of the
    session making it (a thread's, or an asyncio pooled connection's): the server answers a
    repeated id with its first answer, so a retry after a lost connection applies nothing
    twice. A session makes one call at a time: the server keeps one answer per token.
    """

    __slots__ = ("seq", "token")

    def __init__(self) -> None:
        self.token = secrets.token_bytes(16)
        self.seq = 0

    def next_id(self) -> list[Any]:
        """Return the request id of the session's next call, ``[token, seq]``."""
        self.seq += 1
        return [self.token, self.seq]


def reply_timeout(op: Op, args: list[Any], call_timeout: float | None) -> float | bool | None:
    """Return how long to wait for the reply of a call of ``op`` with ``args``.

    False: the usual call timeout (``op`` does not block, or its ``block`` flag is off).
    None: for ever (it waits for ever, or there is no call timeout). Else its wait plus
    ``call_timeout``, which is grace for the network on top of the server's own deadline. A
    wait that is not a number is the server's to refuse, at once: None then (False for a
    number that is not finite or is negative).
    """
    if not op.blocks:
        return False
    if op.block_arg is not None and op.block_arg < len(args) and not args[op.block_arg]:
        return False
    if op.wait_arg is None or call_timeout is None:
        return None
    wait = args[op.wait_arg] if op.wait_arg < len(args) else None
    if type(wait) is int or type(wait) is float:
        # nan, inf and negative waits are refused by the server at once: the usual call
        # timeout (nan + call_timeout made asyncio's wait_for time out before the refusal).
        return wait + call_timeout if 0 <= wait < math.inf else False
    return None


class Call(NamedTuple):
    """One call a flow asks its driver to make: ``runner.call(*call)``."""

    kind: str | None
    ident: str | None
    method: str
    args: list[Any]


Flow = Generator[Call, Any, _T]
"""A multi-step operation: yields calls, is sent their results, returns its own."""


class Runner(Protocol):
    """What a proxy calls through."""

    @property
    def endpoint(self) -> str:
        """``host:port`` of the server."""

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the server."""

    @property
    def call_timeout(self) -> float | None:
        """Seconds allowed for a reply."""

    @property
    def records_calls(self) -> bool:
        """True for a runner that records calls instead of making them (a batch)."""

    @property
    def leases(self) -> LeaseKeeper | None:
        """The keeper of this runner's owner ids and leases; None where nothing can be held."""

    def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        kwds: dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Any:
        """Make one call (``timeout`` overrides the derived reply timeout)."""

    def run(self, flow: Flow[_T]) -> _T:
        """Run a multi-step flow to its end and return its result."""

    def rebuild_info(self) -> tuple[Callable[..., Runner], tuple[Any, ...]]:
        """Return ``(factory, args)``: ``factory(*args)`` is an equivalent runner, in any process.

        Used to pickle proxies; must be picklable.
        """


def run_sync(runner: Runner, flow: Flow[_T]) -> _T:
    """Drive ``flow`` over a blocking ``runner``: each call made as the flow yields it."""
    call = runner.call
    try:
        step = next(flow)
        while True:
            try:
                result = call(step.kind, step.ident, step.method, step.args)
            except BaseException as exc:  # the flow decides: clean up, then (re)raise
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        value: _T = stop.value
        return value
