"""The Valkey/Redis backend: a :class:`~kvclient._runner.Runner`'s calls made as Lua scripts.

:class:`RedisBackend` has the shape of :class:`~kvclient._backend.SocketBackend` (``call``,
``close``, ``timeout``, ``call_timeout``, ``retry``), so :class:`~kvclient.client.Client`,
its proxies and its flows run unchanged on it. A call ``(kind, name, method, args)`` is
dispatched to that kind's handler (:mod:`kvclient._redis.kinds`), which runs the kind's
scripts (:mod:`kvclient._redis.scripts`) through a :class:`Call` context.

Where a container lives: every key of the container ``name`` carries the hash tag
``{name}`` (with ``%``, ``{`` and ``}`` percent-encoded, so a name can never end the tag
early), so they share one slot and one node, and a script may touch them all atomically.
``kv{name}:m`` is its meta hash (kind, creation arguments, version), ``kv{name}:r`` the
request ids it answered, ``kv{name}:d`` its data, then what the kind needs.

Exactly once: a call the schema marks as needing a request id (:func:`kvclient._runner.plan`)
gets ``(token, seq)``, a per-thread random token and a sequence number; the script checks
``kv{name}:r[token]`` and records its answer there in the same atomic step as the change. A
retry after a lost reply (kvclient's :class:`~kvclient.retry.Retry`, the only retry loop)
gets the recorded answer. One answer is kept per client thread per container: a thread makes
one call at a time, so only its last one can still be retried. It is kept for as long as this
client can still retry (:mod:`kvclient._redis._retention`; the token carries that window), in
two generations (``kv{name}:r`` and ``kv{name}:r0``) that the scripts turn over.
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final

from redis import exceptions as rx

from kvclient._redis._nodes import Nodes
from kvclient._redis._retention import Windows, windows
from kvclient._redis.scripts import Script, raw_script, scripts
from kvclient._runner import DERIVED, plan_of
from kvclient.retry import Retry, call_with_retry
from kvproto import schema
from kvproto.codec import MAX_DEPTH, Codec, Ref
from kvproto.errors import (
    AuthError,
    KindError,
    KVConnectionError,
    KVError,
    NoSuchContainerError,
    NotSupportedError,
)
from kvproto.wire import MAX_NAME

__all__ = ["Call", "Handler", "RedisBackend", "container_keys", "tag"]

Handler = Callable[["Call", list[Any]], Any]
"""What runs one method of a kind: given the call's context and its args, return its result."""

_BACKENDS: weakref.WeakSet[RedisBackend] = weakref.WeakSet()
_fork_hook_registered = False
_PREFIX: Final = "kv{"
_WINDOWED: Final = frozenset({"retry", "timeout", "call_timeout"})  # what the windows derive from
_ESCAPES: Final = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def tag(name: str) -> str:
    """Return ``name`` as a hash tag's content: ``%``, ``{`` and ``}`` percent-encoded."""
    return name.translate(_ESCAPES)


def untag(text: str) -> str:
    """Invert :func:`tag`."""
    return text.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


def container_keys(name: str, *suffixes: str) -> list[bytes]:
    """Return the keys of container ``name``: meta, request ids, data, then ``suffixes``."""
    base = f"{_PREFIX}{tag(name)}}}:"
    return [(base + suffix).encode() for suffix in ("m", "r", "d", *suffixes)]


@functools.lru_cache(maxsize=4096)
def _call_keys(name: str) -> tuple[bytes, ...]:
    """The keys every call's context starts with (cached: a name's keys never change)."""
    return tuple(container_keys(name, "k", "o"))


def _name_of(meta_key: bytes) -> str:
    """Return the container name of a meta key ``kv{...}:m``."""
    return untag(meta_key.decode()[len(_PREFIX) : -3])


def check_name(name: Any) -> str:
    """Return ``name`` if it can name a container (as kvserve requires).

    Raises:
        ValueError: not a non-empty str of at most ``MAX_NAME`` characters.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ValueError(f"container names are non-empty str of at most {MAX_NAME} chars")
    return name


# Exceptions a script may answer with, by the name it gives.
_ERRORS: Final[dict[str, Callable[[str], BaseException]]] = {
    "KeyError": KeyError,
    "IndexError": IndexError,
    "ValueError": ValueError,
    "TypeError": TypeError,
    "AttributeError": AttributeError,
    "RuntimeError": RuntimeError,
    "OverflowError": OverflowError,
}


def _no_method(kind: str, ident: str, method: str) -> Exception:
    """What a call of a method this backend has no handler for raises.

    NotSupportedError for an operation of an optional feature the schema names (watch, TTL:
    README's guarantees table), AttributeError for one no backend has.
    """
    message = schema.unsupported(kind, method, "the Valkey/Redis backend")
    if message is not None:
        return NotSupportedError(message)
    return AttributeError(f"{kind} {ident!r} has no method {method!r}")


class _Session:
    """One thread's codec and request-id sequence."""

    __slots__ = ("codec", "seq", "token")

    def __init__(self, codec: Codec, keep_ms: int) -> None:
        self.codec = codec
        self.token = f"{secrets.token_hex(16)}:{keep_ms}"  # the scripts keep its answer keep_ms
        self.seq = 0


class Call:
    """One call's context, handed to its kind's handler.

    Attributes:
        kind: the container's kind.
        name: its name.
        keys: its keys (see :func:`container_keys`); a handler may append its own.
        codec: this thread's codec: ``pack`` a value to store, ``unpack`` one read.
        token: the request id's token, '' for a call without one.
        seq: the request id's sequence number, as text.
        in_batch: the call is part of a batch: a blocking call must not wait.
    """

    __slots__ = ("_backend", "codec", "in_batch", "keys", "kind", "name", "seq", "token")

    def __init__(
        self, backend: RedisBackend, kind: str, name: str, session: _Session, rid: bool
    ) -> None:
        self._backend = backend
        self.kind = kind
        self.name = name
        self.keys = list(_call_keys(name))
        self.codec = session.codec
        self.in_batch = False
        if rid:
            session.seq += 1
            self.token, self.seq = session.token, str(session.seq)
        else:
            self.token, self.seq = "", "0"

    @property
    def call_timeout(self) -> float | None:
        """The client's call timeout (seconds, None for ever)."""
        return self._backend.call_timeout

    @property
    def windows(self) -> Windows:
        """How long the server keeps what this client may still retry (milliseconds)."""
        return self._backend.windows

    def pack(self, value: Any) -> bytes:
        """Encode ``value`` as stored (kvclient's codec: tuples stay tuples, bytes bytes)."""
        return self.codec.pack(value)

    def unpack(self, data: bytes) -> Any:
        """Decode a stored value."""
        return self.codec.unpack(data)

    def read(self, script: Script, *argv: Any) -> list[Any]:
        """Run a script that changes nothing (a snapshot a later script commits against).

        It runs without the request id: only the script that answers the call records under
        it. Returns the payload of its ``ok`` answer.
        """
        found = self._run(script, "", "0", argv)
        assert found is not None, f"{script.name} answered 'again'"
        return found

    def run(self, script: Script, *argv: Any) -> list[Any] | None:
        """Run one of this kind's scripts; return its answer's payload.

        The call's request id goes with it: a call of several scripts runs the one that
        answers it (and records the answer) with :meth:`run`, the others with :meth:`read`.

        Returns:
            The payload of an ``ok`` answer (a list), or None for ``again`` (not answered
            yet: the caller waits or recomputes; nothing was recorded).

        Raises:
            KeyError, IndexError, ValueError, TypeError, ...: what the script answered.
            NoSuchContainerError: the container was dropped.
            KindError: the name is now another kind of container.
            KVConnectionError: see :meth:`kvclient._redis._nodes.Nodes.execute`.
        """
        return self._run(script, self.token, self.seq, argv)

    def _run(self, script: Script, token: str, seq: str, argv: tuple[Any, ...]) -> list[Any] | None:
        reply = self._backend.evalsha(
            script, self.keys, [self.kind, token, seq, *argv], confirm=token != ""
        )
        status = reply[0]
        if status == b"ok":
            return list(reply[1:])
        if status == b"again":
            return None
        raise self.error(reply[1].decode(), reply[2].decode() if len(reply) > 2 else "")

    def error(self, name: str, detail: str) -> BaseException:
        """Return the exception a script's ``{'err', name, detail}`` answer stands for."""
        if name == "NoSuchContainerError":
            return NoSuchContainerError(
                f"no container named {self.name!r}; it was dropped or never created"
            )
        if name == "KindError":
            return KindError(f"{self.name!r} is a {detail}, not a {self.kind}")
        if name == "Empty":
            import queue  # noqa: PLC0415 - only a queue call raises it

            return queue.Empty()
        if name == "Full":
            import queue  # noqa: PLC0415

            return queue.Full()
        factory = _ERRORS.get(name)
        if factory is None:
            return KVError(f"{self.name!r}: the script answered {name}: {detail}")
        return factory(detail)

    def execute(self, *command: Any) -> Any:
        """Send one plain command to this container's node (its first key's slot)."""
        return self._backend.nodes.execute(self.keys[0], *command)

    def sleep(self, seconds: float) -> None:
        """Pause this call (a poll's interval): the thread, or on asyncio only its task."""
        self._backend.sleep(seconds)


class RedisBackend:
    """Calls to one Valkey/Redis server or cluster, made as Lua scripts.

    Args:
        nodes: the server's or cluster's nodes.
        kinds: kind -> method -> handler (:data:`kvclient._redis.kinds.KINDS`).
        server: server-level method -> handler (given the backend and the call's args).
        timeout: seconds for connecting.
        call_timeout: seconds for each reply; None: for ever.
        retry: what to do when a connection fails; None never retries.
        make_ref: turns a container reference read back into a proxy.
        to_ref: turns a proxy being stored into a reference.
        durability: None, or ``"replica"``: every call that changes state is confirmed by
            ``WAIT 1`` (a replica has it) on the connection that made it, or raises.
    """

    def __init__(
        self,
        nodes: Nodes,
        kinds: dict[str, dict[str, Handler]],
        server: dict[str, Callable[[RedisBackend, list[Any]], Any]],
        timeout: float | None,
        call_timeout: float | None,
        retry: Retry | None,
        make_ref: Callable[[Ref], Any],
        to_ref: Callable[[Any], Ref | None],
        durability: str | None = None,
    ) -> None:
        global _fork_hook_registered  # noqa: PLW0603 - registered once, on first use
        self.nodes = nodes
        self.endpoint = nodes.endpoint
        self.address = nodes.seeds[0]
        self._kinds = kinds
        self._server = server
        self.timeout = timeout
        self.call_timeout = call_timeout
        self.retry = retry
        self._make_ref = make_ref
        self._to_ref = to_ref
        if durability not in (None, "replica"):
            raise ValueError(f"durability must be None or 'replica', not {durability!r}")
        self.durability = durability
        self._renew_windows()
        self.closed = False
        _BACKENDS.add(self)
        if not _fork_hook_registered:
            _fork_hook_registered = True
            os.register_at_fork(after_in_child=_after_fork_in_child)

    def __setattr__(self, name: str, value: Any) -> None:
        """Set an attribute; a new retry, timeout or call_timeout renews :attr:`windows`."""
        object.__setattr__(self, name, value)
        if name in _WINDOWED and "_local" in self.__dict__:
            self._renew_windows()

    def _renew_windows(self) -> None:
        """Derive the windows from the settings; each thread's next call takes a new token."""
        self.windows = windows(self.retry, self.timeout, self.call_timeout)
        self._local = threading.local()

    def close(self) -> None:
        """Close every connection."""
        self.closed = True
        self.nodes.close()

    def sleep(self, seconds: float) -> None:
        """Pause the calling thread (:mod:`kvclient._redis.aio` pauses only the task)."""
        time.sleep(seconds)

    def session(self) -> _Session:
        """Return this thread's session (codec, request-id sequence)."""
        try:
            found: _Session = self._local.session
        except AttributeError:
            codec = Codec(make_ref=self._make_ref, to_ref=self._to_ref, encode_depth=MAX_DEPTH)
            found = self._local.session = _Session(codec, self.windows.request_ids)
        return found

    def evalsha(
        self, script: Script, keys: list[bytes], argv: list[Any], confirm: bool = False
    ) -> Any:
        """Run ``script`` on the node of ``keys[0]`` (loading it there if it is missing).

        ``confirm`` (a call that changes state, with ``durability="replica"``): follow it
        with ``WAIT 1`` on the same connection (``WAITAOF`` where the node has it and a
        replica keeps an AOF: :meth:`~kvclient._redis._nodes.Nodes._confirmation`).

        Raises:
            KVConnectionError: ``confirm``, and no replica confirmed the write within the
                call timeout (it is applied on the master; a retry, with the same request
                id, applies nothing again and waits for a replica anew).
        """
        if self.closed:
            raise KVError(f"client for {self.endpoint} is closed")
        then = None
        if confirm and self.durability == "replica":
            wait_ms = 1000 if self.call_timeout is None else max(1, int(self.call_timeout * 500))
            then = ("WAIT", 1, wait_ms)
        node_key = keys[0]
        try:
            try:
                reply = self.nodes.execute(
                    node_key, "EVALSHA", script.sha, len(keys), *keys, *argv, then=then
                )
            except rx.NoScriptError:
                reply = self.nodes.execute(
                    node_key, "EVAL", script.text, len(keys), *keys, *argv, then=then
                )
        except rx.ResponseError as exc:
            raise KVError(f"{self.endpoint}: script {script.name} failed: {exc}") from None
        if then is None:
            return reply
        result, confirmed = reply
        if confirmed.enough:
            return result
        raise KVConnectionError(
            f"{self.endpoint}: {script.name} was applied on the master of its slot but "
            f"{confirmed.shortfall} (durability='replica')"
        )

    def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        kwds: dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Any:
        """Make one call and return its result (as :meth:`SocketBackend.call`).

        Raises:
            KVConnectionError: the connection failed, and retrying did not help.
            AttributeError: the kind has no such method.
            BaseException: what the operation raised.
        """
        if ident is None:
            server_handler = self._server.get(method)
            if server_handler is None:
                raise AttributeError(f"the server has no method {method!r}")
            return self._retrying(lambda: server_handler(self, args))
        if kind is None:
            raise KVError(f"{self.endpoint}: a call on {ident!r} must name its kind")
        handler = self._kinds.get(kind, {}).get(method)
        if handler is None:
            raise _no_method(kind, ident, method)
        op = plan_of(kind, method)
        ctx = Call(self, kind, ident, self.session(), op is not None and op.needs_id)
        try:  # the first attempt without the retry loop's frames; a failed one enters it
            return handler(ctx, args)
        except AuthError:
            raise
        except KVConnectionError as exc:
            return self._retrying(lambda: handler(ctx, args), exc)

    def batch(self, calls: list[list[Any]], kinds: list[str | None]) -> list[list[Any]]:
        """Make the calls of a :class:`~kvclient.client.Batch` in order; errors as values.

        Each call is its own atomic script with its own request id (as on kvserve, a batch
        is not a transaction); a blocking queue call never waits (``in_batch``). Answers in
        kvserve's shape, ``[[0, result], ...]``.
        """
        out: list[list[Any]] = []
        for (ident, method, args, _kwds), kind in zip(calls, kinds, strict=True):
            try:
                if ident is None or kind is None:
                    raise ValueError(f"a batch holds container calls, not {method!r}")
                handler = self._kinds.get(kind, {}).get(method)
                if handler is None:
                    raise _no_method(kind, ident, method)
                ctx = self.new_call(kind, ident, method)
                ctx.in_batch = True
                out.append([0, self._retrying(functools.partial(handler, ctx, args))])
            except Exception as exc:  # the batch answers it as this call's result
                out.append([1, exc])
        return out

    def new_call(self, kind: str, name: str, method: str) -> Call:
        """Return the context of a call of ``method`` on ``name`` (batches, flows)."""
        op = plan_of(kind, method)
        return Call(self, kind, name, self.session(), op is not None and op.needs_id)

    def _retrying(self, attempt: Callable[[], Any], error: KVConnectionError | None = None) -> Any:
        """Run ``attempt`` until it answers or the retries run out (the only retry loop).

        ``error``: a first attempt already failed so (``call`` makes it outside the loop).
        The asyncio backend overrides this to sleep its backoff in asyncio.
        """
        return call_with_retry(self.retry, self.endpoint, attempt, error)

    def _reset_after_fork(self) -> None:
        self._local = threading.local()
        self.nodes.reset_after_fork()


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._reset_after_fork()


def server_script(name: str) -> Script:
    """Return a script run without the per-kind prologue (``create``, ``drop``)."""
    return raw_script(name)


def kind_scripts(kind_file: str) -> dict[str, Script]:
    """Return the scripts of ``<kind_file>.lua`` (see :mod:`kvclient._redis.scripts`)."""
    return scripts(kind_file)
