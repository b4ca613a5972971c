"""The kvmanager wire: framing, the handshake's bytes, request and reply shapes. Defined here once.

Client and server both speak through this module: the frame format, its limits, the reply
tags and the request rules are defined here and nowhere else. It does no I/O: the blocking
client, the server's event loop and an asyncio client all feed it bytes. Two hot paths apply
these definitions inline rather than through a function call per request (measurable at a
few microseconds per operation): the loop's and the blocking connection's small-frame send
(``HEADER.pack(len(payload)) + payload``, exactly :func:`frame_parts` for one part) and
their common-case checks (a ``RETURN`` reply, a list of args), which fall back to the
functions here, whose errors are the ones raised, whenever the common case does not hold.
Values inside messages are encoded by :mod:`kvproto.codec`; what each operation is
(mutating, blocking) is in :mod:`kvproto.schema`.

Framing
-------
Every message, in both directions, is one frame::

    +----------------+---------------------------+
    | length: u32 BE | payload: `length` bytes   |
    +----------------+---------------------------+

The length excludes the 4 header bytes. A receiver refuses a length above its limit (the
server's ``--max-frame``, default 64 MiB; 256 bytes before authentication; a client accepts
replies of up to 1 GiB, ``MAX_REPLY_FRAME``) *before* allocating anything, and closes the
connection (:class:`FrameTooLargeError`).

Handshake (raw bytes, not msgpack; HMAC-SHA256 both ways, ``K`` = authkey)
----------------------------------------------------------------------------
::

    C -> S  HELLO                              sent at once, before reading anything
    S -> C  CHALLENGE + Ns                     Ns: 32 random bytes
    C -> S  HMAC(K, "kv-client" + Ns) + Nc + u16 BE client wire version
    S -> C  WELCOME + HMAC(K, "kv-server" + Nc + Ns) + u16 BE server wire version
       or   FAILURE                            (wrong key; the server then closes)
       or   VERSION + u16 BE server version    (right key, other wire version; then closes)

The client speaks first (HELLO) so that a plain client reaching a TLS port is refused at once
by the TLS layer instead of both sides waiting for the other. With TLS, all of this runs inside
the TLS session. The role labels stop a peer from reflecting one side's MAC back at it, and
fresh nonces on both sides make a captured handshake useless to replay. Nothing before WELCOME
reveals the server's version. The state machines of both sides are in :mod:`kvproto.handshake`:
a client raises :class:`~kvproto.errors.AuthError` on FAILURE or on a bad server MAC, and
:class:`~kvproto.errors.ProtocolError` on VERSION or anything else unexpected.

Messages (msgpack arrays, after the handshake)
----------------------------------------------
Request: ``[ident, method, args, kwds]`` or ``[ident, method, args, kwds, rid]``, the first
four as in ``multiprocessing.managers``:

- ``ident`` is ``nil`` for server-level calls (``create``, ``names``, ``drop``, ``ping``,
  ``batch``, ...) or a container name (a str of at most ``MAX_NAME`` chars);
- ``method`` is a str of at most ``MAX_METHOD`` chars; ``args`` an array; ``kwds`` a map or
  ``nil``;
- ``rid``, the request id, is ``[token, seq]``: ``token`` 1 to 64 bytes naming the client
  session (one per client thread, kept across reconnects), ``seq`` an int growing with each
  call of that session. The server remembers the answer to each session's last call that may
  change state (:mod:`kvproto.schema` says which) and answers a repeated id with it instead of
  applying the call again: retries after a lost connection are exactly-once.

Reply: ``[kind, value]`` with ``kind`` one of ``"#RETURN"`` (value is the result) or
``"#ERROR"`` (value is an exception ext). A ``batch`` request carries
``[[ident, method, args, kwds], ...]`` (at most ``MAX_BATCH``, 10,000) as its only argument and
returns an array of ``[kind, value]`` pairs, one per call, in order; the batch's own request
id covers its calls.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from kvproto.errors import ProtocolError

__all__ = [
    "CHALLENGE",
    "ERROR",
    "FAILURE",
    "HEADER",
    "HELLO",
    "MAX_BATCH",
    "MAX_FRAME_DEFAULT",
    "MAX_HANDSHAKE_FRAME",
    "MAX_METHOD",
    "MAX_NAME",
    "MAX_REPLY_FRAME",
    "NONCE_SIZE",
    "RETURN",
    "RETURN_HEAD",
    "RID_TOKEN_MAX",
    "VERSION",
    "WELCOME",
    "WIRE_VERSION",
    "FrameDecoder",
    "FrameTooLargeError",
    "MalformedReplyError",
    "check_args",
    "frame_end",
    "frame_parts",
    "frame_size",
    "parse_request",
    "request",
    "unwrap_reply",
    "valid_rid",
]

WIRE_VERSION: Final = 1
HEADER: Final = struct.Struct(">I")
MAX_FRAME_DEFAULT: Final = 64 * 1024 * 1024
# Replies are the client's own data (copy() of a big dict, a dump): it accepts much larger
# frames than the server accepts requests, and still refuses a server claiming gigabytes.
MAX_REPLY_FRAME: Final = 1024 * 1024 * 1024
MAX_HANDSHAKE_FRAME: Final = 256
NONCE_SIZE: Final = 32
HELLO: Final = b"#KV-HELLO#"
CHALLENGE: Final = b"#KV-CHALLENGE#"
WELCOME: Final = b"#KV-WELCOME#"
FAILURE: Final = b"#KV-FAILURE#"
VERSION: Final = b"#KV-VERSION#"

RETURN: Final = "#RETURN"
ERROR: Final = "#ERROR"
RETURN_HEAD: Final = b"\x92\xa7" + RETURN.encode()
"""The first payload bytes of a ``[RETURN, value]`` reply as msgpack writes it (an array of
two, the tag as a 7-byte str): a client seeing them decodes only what follows, the value."""
MAX_BATCH: Final = 10_000
MAX_NAME: Final = 1024
MAX_METHOD: Final = 64
RID_TOKEN_MAX: Final = 64
"""Most bytes of a request id's session token."""
# Below this a payload is copied behind its header (one small copy beats a two-part send);
# above, header and payload go out as two parts and the payload is never copied.
_CONCAT_LIMIT: Final = 64 * 1024


class FrameTooLargeError(ProtocolError):
    """A frame header announced more bytes than the receiver accepts.

    Attributes:
        size: the announced payload length, bytes.
        limit: the receiver's limit, bytes.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a {size}-byte frame is over the {limit}-byte limit")
        self.size = size
        self.limit = limit


class MalformedReplyError(ProtocolError):
    """What came back is not a ``[kind, value]`` reply: the stream cannot be trusted further."""


# -- framing -----------------------------------------------------------------------------------


def frame_parts(payload: bytes) -> tuple[bytes, ...]:
    """Return the pieces to send, in order, for one frame carrying ``payload``.

    One piece for a small payload (header and payload joined), two for a large one, whose
    payload is then never copied.
    """
    header = HEADER.pack(len(payload))
    if len(payload) <= _CONCAT_LIMIT:
        return (header + payload,)
    return (header, payload)


def frame_size(buf: bytes | bytearray | memoryview, pos: int, limit: int) -> int:
    """Return the payload length of the frame starting at ``buf[pos]``; -1 before 4 bytes.

    Raises:
        FrameTooLargeError: its header announces more than ``limit`` bytes (checked as soon
            as the 4 header bytes are in, before anything is allocated for it).
    """
    if len(buf) - pos < 4:
        return -1
    (size,) = HEADER.unpack_from(buf, pos)
    if size > limit:
        raise FrameTooLargeError(size, limit)
    return size  # type: ignore[no-any-return]


def frame_end(buf: bytes | bytearray | memoryview, pos: int, limit: int) -> int:
    """Return where the frame starting at ``buf[pos]`` ends, or -1 if it is not complete yet.

    The payload is ``buf[pos + 4 : end]``.

    Raises:
        FrameTooLargeError: as :func:`frame_size`.
    """
    size = frame_size(buf, pos, limit)
    if size < 0:
        return -1
    end = pos + 4 + size
    return end if len(buf) >= end else -1


class FrameDecoder:
    """Cut a byte stream into frame payloads, incrementally, refusing frames over ``limit``.

    For transports that hand over bytes as they come (an asyncio protocol, a test)::

        decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        for payload in decoder.feed(data):
            ...

    Args:
        limit: largest payload accepted, bytes; :attr:`limit` may be raised later (after the
            handshake).
    """

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received that do not complete a frame yet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take more bytes; return the payloads of the frames they complete, in order.

        Raises:
            FrameTooLargeError: a header announces more than :attr:`limit`; the stream is
                then unusable (the decoder keeps refusing it).
        """
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        try:
            while (end := frame_end(buf, pos, self.limit)) >= 0:
                frames.append(bytes(buf[pos + 4 : end]))
                pos = end
        finally:
            del buf[:pos]
        return frames


# -- messages ----------------------------------------------------------------------------------


def request(
    ident: str | None,
    method: str,
    args: list[Any],
    kwds: dict[str, Any] | None = None,
    rid: list[Any] | None = None,
) -> list[Any]:
    """Return the message for one call (``rid``: the request id, see the module docstring)."""
    if rid is None:
        return [ident, method, args, kwds]
    return [ident, method, args, kwds, rid]


def valid_rid(rid: Any) -> bool:
    """Return whether ``rid`` is a well-formed request id, ``[token, seq]``."""
    return (
        type(rid) is list
        and len(rid) == 2
        and type(rid[0]) is bytes
        and 0 < len(rid[0]) <= RID_TOKEN_MAX
        and type(rid[1]) is int
    )


def parse_request(message: Any) -> list[Any] | None:
    """Check the shape of one decoded request; return its request id (None without one).

    The request id, if any, is popped off ``message``, which is then
    ``[ident, method, args, kwds]``. The args and kwds are checked where they are used (a
    stdlib no-op ignores them).

    Raises:
        ProtocolError: not a request: the wrong length, a name or method that is not a str
            (or too long: checked before anything echoes them in an error, since a 40 MB name
            became a 160 MB repr), or a malformed request id.
    """
    if type(message) is not list or not 4 <= len(message) <= 5:
        raise ProtocolError("malformed request: expected 4 or 5 elements")
    ident, method = message[0], message[1]
    if (ident is not None and (type(ident) is not str or len(ident) > MAX_NAME)) or (
        type(method) is not str or len(method) > MAX_METHOD
    ):
        raise ProtocolError(
            f"malformed request: the name must be nil or a str of at most {MAX_NAME} "
            f"chars, the method a str of at most {MAX_METHOD}"
        )
    if len(message) == 5:
        rid = message.pop()
        if not valid_rid(rid):
            raise ProtocolError("malformed request id")
        return rid  # type: ignore[no-any-return]
    return None


def check_args(args: Any, kwds: Any) -> None:
    """Check a request's args (an array) and kwds (a map or nil).

    Raises:
        ProtocolError: they are something else.
    """
    if type(args) not in (list, tuple) or (kwds is not None and type(kwds) is not dict):
        raise ProtocolError("malformed request: args must be an array, kwds a map or nil")


def unwrap_reply(reply: Any) -> Any:
    """Return the value of one ``[kind, value]`` reply, or raise the exception it carries.

    Raises:
        MalformedReplyError: it is not a reply. The caller closes the connection: a stream
            that carried it cannot be trusted to pair the next reply with the next request.
        BaseException: whatever the call raised on the server (a ``KVConnectionError``
            means it is going away: the caller closes too and reconnects for the next call).
    """
    if type(reply) is list and len(reply) == 2:
        kind, value = reply
        if kind == RETURN:
            return value
        if kind == ERROR and isinstance(value, BaseException):
            raise value
    raise MalformedReplyError("malformed reply")
