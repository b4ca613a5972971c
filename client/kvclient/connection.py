"""One authenticated, blocking client connection: framing, the handshake, request/reply.

A :class:`Connection` belongs to one thread (the :class:`~kvclient.client.Client` keeps one per
thread, as stdlib proxies do). Every socket error is translated here, through
:func:`kvclient.errors.translate_os_error` (while connecting,
:func:`kvclient.errors.translate_handshake_error`), and any failure or interrupt in the middle of
a call closes the connection: a late reply can then never be read as the answer to a later call.

A connection also has the ``send``/``recv`` surface of ``multiprocessing.connection``, which
:mod:`kvclient.stdlib` gives a stdlib ``BaseManager`` to talk to kvserve over.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from msgpack import Packer
from msgpack import unpackb as _unpackb

from kvclient.errors import needs_tls_probe, translate_handshake_error
from kvproto._mypyc import mypyc_attr
from kvproto.address import DEFAULT_PORT, parse_address
from kvproto.codec import MAX_DEPTH, Codec, Ref
from kvproto.errors import (
    AuthError,
    KVConnectionError,
    ProtocolError,
    translate_os_error,
)
from kvproto.handshake import ClientHandshake
from kvproto.net import format_address, tune_socket
from kvproto.wire import (
    HEADER,
    MAX_HANDSHAKE_FRAME,
    MAX_REPLY_FRAME,
    RETURN_HEAD,
    FrameTooLargeError,
    MalformedReplyError,
    frame_parts,
    frame_size,
    unwrap_reply,
)

if TYPE_CHECKING:
    import ssl  # loaded only by TLS, or by speaks_tls after a failure

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "Connection",
    "format_address",
    "parse_address",
    "tune_socket",
]

DEFAULT_ADDRESS: Final = f"127.0.0.1:{DEFAULT_PORT}"
_RECV_CHUNK: Final = 64 * 1024
# Requests up to this size are sent as header + payload joined, as kvproto.wire.frame_parts
# sends them (a copy cheaper than a second send), but inline; larger ones go through it.
_INLINE_SEND: Final = 64 * 1024
_VALUE_AT: Final = 4 + len(RETURN_HEAD)  # where a [RETURN, value] frame's value begins
# A reply frame's length and first payload bytes, read in one call; _SHORT for a reply too
# short to be [RETURN, value] (it goes the long way, as one split over several recvs does).
_REPLY_HEAD: Final = struct.Struct(f">I{len(RETURN_HEAD)}s")
_SHORT: Final = (-5, b"")  # a size no first recv matches: n - 4 >= -4
# The whole frame of [RETURN, None], what every SET, delete and clear answers: compared, not
# decoded (a frame of _NIL_SIZE payload bytes, within any max_frame a server could answer).
_NIL_SIZE: Final = len(RETURN_HEAD) + 1
_NIL_REPLY: Final = HEADER.pack(_NIL_SIZE) + RETURN_HEAD + b"\xc0"
# Bound once: `HEADER.pack(size)` in a call's argument list binds a new method object per call.
_pack_header: Final = HEADER.pack

# What a request's args must all be for its depth check to be skipped (as Codec.pack_request).
_SCALARS: Final = frozenset({str, bytes, int, float, bool, type(None)})

_MAX_SOCKET_TIMEOUT: Final = 400 * 86400.0  # beyond the server's longest wait (a year)


# Weakly referenced (SocketBackend._conns): not a mypyc native class in the compiled build.
@mypyc_attr(native_class=False)
class Connection:
    """A connected, authenticated socket speaking kvmanager frames.

    Args:
        address: ``(host, port)`` to connect to.
        authkey: the shared key.
        timeout: seconds for connecting and the handshake, and the default for each call;
            None waits forever.
        make_ref: turns a decoded container reference into a proxy (see :class:`Codec`).
        to_ref: turns a proxy being encoded into a reference.
        max_frame: largest reply accepted, bytes.
        tls: wrap the connection in TLS with this client context (host name checked).

    Raises:
        KVConnectionError: the server is unreachable (names the address, hints at kvserve).
        AuthError: the key was rejected.
        ProtocolError: the peer is not kvserve, or speaks another wire version.
        TLSError: TLS failed (certificate refused, or only one side speaks TLS).
    """

    __slots__ = (
        "__weakref__",
        "_applied_timeout",
        "_big",
        "_pack",
        "_sock",
        "_tls",
        "closed",
        "codec",
        "endpoint",
        "max_frame",
        "timeout",
    )

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        timeout: float | None = 10.0,
        *,
        make_ref: Callable[[Ref], Any] | None = None,
        to_ref: Callable[[Any], Ref | None] | None = None,
        max_frame: int = MAX_REPLY_FRAME,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._sock: socket.socket | None = None
        # True once the connection is closed; it cannot be reopened. An attribute, not a
        # property over _sock: the client checks it on every call.
        self.closed = False
        self._tls = False
        self._big: bytearray | None = None
        self._applied_timeout: float | bool | None = False
        self.endpoint = format_address(*address)
        self.timeout = timeout
        self.max_frame = max_frame
        self.codec = Codec(make_ref, to_ref, encode_depth=MAX_DEPTH, decode_depth=None)
        # The fast encoder of a request: msgpack with no ``default`` hook, so whatever the wire
        # encodes specially (a tuple, a proxy, an int beyond 64 bits, a subclass of str) or
        # refuses raises in it, and the request goes through Codec.pack_request, the reference,
        # instead; what it encodes is the reference's bytes, byte for byte (msgpack's own
        # encoding of native values, tests/test_client_call_path.py). It saves the
        # reference's Python call and flags on every request.
        self._pack = Packer(use_bin_type=True, strict_types=True, autoreset=True).pack
        try:
            self._sock = socket.create_connection(address, timeout)
        except OSError as exc:
            raise translate_os_error(exc, self.endpoint, "connect to") from exc
        try:
            tune_socket(self._sock)
            if tls is not None:
                self._start_tls(tls, address[0])
            self._handshake(authkey, address)
            if not self._tls:
                # Blocking mode from here on, with the call timeout in SO_RCVTIMEO/SNDTIMEO:
                # Python's own timeouts poll() before every send and recv (two extra
                # syscalls per call).
                self._sock.settimeout(None)
                self._applied_timeout = None
        except BaseException:
            self.close()
            raise

    def _apply_timeout(self, sock: socket.socket, seconds: float | None) -> None:
        if seconds is not None and not 0 <= seconds <= _MAX_SOCKET_TIMEOUT:
            # A wait the server will refuse (nan, inf, negative, absurdly long): its answer
            # comes at once, so waiting without a socket timeout is safe, and it keeps the
            # server's clear ValueError instead of an OverflowError from the socket layer.
            seconds = None
        if self._tls:
            sock.settimeout(seconds)
        else:
            whole = int(seconds or 0)
            micro = int(((seconds or 0) - whole) * 1_000_000)
            if seconds is not None and whole == 0 and micro == 0:
                micro = 1  # a zero timeval means "no timeout"
            timeval = struct.pack("ll", whole, micro)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._applied_timeout = seconds

    def _start_tls(self, context: ssl.SSLContext, host: str) -> None:
        assert self._sock is not None
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=host)
            self._tls = True
        except OSError as exc:  # ssl.SSLError is one
            raise translate_handshake_error(exc, self.endpoint, stage="tls", tls=True) from exc

    def _handshake(self, authkey: bytes, address: tuple[str, int]) -> None:
        try:
            # Hello first, without waiting: a TLS server refuses it at once (see kvproto.wire).
            handshake = ClientHandshake(authkey)
            self._send_frame(handshake.hello)
            self._send_frame(handshake.on_challenge(bytes(self._recv_frame(MAX_HANDSHAKE_FRAME))))
            try:
                handshake.on_welcome(bytes(self._recv_frame(MAX_HANDSHAKE_FRAME)))
            except AuthError as exc:
                raise AuthError(f"{self.endpoint}: {exc}") from None
        except (EOFError, OSError) as exc:  # OSError: ssl.SSLError too
            probe = needs_tls_probe(exc, self._tls) and speaks_tls(address, self.timeout)
            raise translate_handshake_error(
                exc, self.endpoint, stage="hello", tls=self._tls, expects_tls=probe
            ) from exc

    def __del__(self) -> None:
        # A thread's connection dies with the thread's locals; close it rather than leak it.
        self.close()

    def close(self) -> None:
        """Close the socket. Safe to call more than once."""
        self.closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- framing ----------------------------------------------------------------------------

    def _send_frame(self, payload: bytes) -> None:
        assert self._sock is not None
        for part in frame_parts(payload):  # no copy of a large payload to prepend 4 bytes
            self._sock.sendall(part)

    def _recv_frame(self, limit: int, data: bytes | None = None) -> bytes | memoryview:
        """Receive one frame's payload; ``data``: what a first recv() already returned."""
        sock = self._sock
        assert sock is not None
        if data is None:
            data = sock.recv(_RECV_CHUNK)
        if not data:
            raise EOFError
        while len(data) < 4:
            more = sock.recv(_RECV_CHUNK)
            if not more:
                raise EOFError
            data += more
        try:
            size = frame_size(data, 0, limit)
        except FrameTooLargeError as exc:
            if limit == MAX_HANDSHAKE_FRAME:
                raise ProtocolError(
                    f"{self.endpoint} does not speak the kvmanager protocol (its first bytes "
                    f"are {bytes(data[:8])!r}); is that address a kvserve server?"
                ) from None
            raise ProtocolError(
                f"{self.endpoint} sent a {exc.size}-byte frame, over the {limit}-byte limit"
            ) from None
        end = 4 + size
        if len(data) == end:
            return data[4:]
        if len(data) > end:
            # Replies come one per request, so extra bytes mean the peer is not kvserve.
            raise ProtocolError(f"{self.endpoint} sent more than one reply")
        # A large reply goes into a buffer kept for the next one: fresh memory costs page
        # faults per call, and a bytes() copy of it would cost them twice.
        if self._big is None or len(self._big) < size:
            self._big = bytearray(max(size, 2 * _RECV_CHUNK))
        view = memoryview(self._big)[:size]
        got = len(data) - 4
        view[:got] = memoryview(data)[4:]
        while got < size:
            n = sock.recv_into(view[got:])
            if not n:
                raise EOFError
            got += n
        return view

    # -- calls ------------------------------------------------------------------------------

    def call(self, message: list[Any], timeout: float | bool | None = False) -> Any:
        """Send one request and return its result, raising what the server raised.

        Args:
            message: ``[ident, method, args, kwds]``.
            timeout: seconds to wait for the reply; False means the connection's default,
                None waits forever.

        Raises:
            TypeError: a value cannot be encoded (nothing was sent).
            KVConnectionError: the connection failed or timed out; it is now closed.
            ProtocolError: the reply was not understood; the connection is now closed.
        """
        codec = self.codec
        try:
            payload: bytes = self._pack(message)
        except Exception:  # see _pack: the reference encodes it, or raises its TypeError
            payload = codec.pack_request(message)
        else:
            # The depth check of Codec.pack_request: a payload this short cannot nest deeper
            # than MAX_DEPTH, nor can scalar args (a request id is [bytes, int]).
            if len(payload) > MAX_DEPTH:
                if message[3] is not None:
                    payload = codec.pack_request(message)
                else:
                    for arg in message[2]:
                        if type(arg) not in _SCALARS:
                            payload = codec.pack_request(message)
                            break
        sock = self._sock
        if sock is None:
            raise ProtocolError(f"connection to {self.endpoint} is closed")
        try:
            wanted = self.timeout if timeout is False else timeout
            applied = self._applied_timeout
            if wanted is not applied and wanted != applied:
                self._apply_timeout(sock, wanted)
            size = len(payload)
            if size <= _INLINE_SEND:
                # The common small request as one sendall, without _send_frame's two calls.
                sock.sendall(_pack_header(size) + payload)
            else:
                self._send_frame(payload)
            # The common small reply, whole in the first recv, inline; else _recv_frame.
            data = sock.recv(_RECV_CHUNK)
            if data == _NIL_REPLY and self.max_frame >= _NIL_SIZE:
                return None
            n = len(data)
            size, head = _REPLY_HEAD.unpack_from(data) if n > _VALUE_AT else _SHORT
            if size == n - 4 and size <= self.max_frame:
                if head == RETURN_HEAD:
                    # [RETURN, value]: only the value is decoded (no list, no tag string),
                    # as Codec.unpack_reply does, inline: this codec has no decode limits.
                    value = data[_VALUE_AT:]
                    try:
                        return _unpackb(value, strict_map_key=False, ext_hook=codec.ext_hook)
                    except Exception:  # a tuple, a bigint, or garbage: unpack() decides
                        return codec.unpack(value)
                reply = codec.unpack_reply(memoryview(data)[4:])
            else:
                reply = codec.unpack_reply(self._recv_frame(self.max_frame, data))
        except (OSError, EOFError) as exc:
            self.close()
            raise translate_os_error(exc, self.endpoint, "call") from exc
        except BaseException:
            # Timeout, KeyboardInterrupt, bad frame: the reply (if any) is still in flight,
            # and reading it later would pair it with the wrong call.
            self.close()
            raise
        return self.unwrap(reply)

    def unwrap(self, reply: Any) -> Any:
        """Turn one ``[kind, value]`` reply into its value or raise its exception."""
        try:
            return unwrap_reply(reply)
        except KVConnectionError:
            self.close()  # the server is going away; the next call reconnects
            raise
        except MalformedReplyError:
            self.close()
            raise ProtocolError(f"malformed reply from {self.endpoint}") from None

    # -- the multiprocessing.connection.Connection surface, for stdlib BaseManager ----------

    def send(self, obj: Any) -> None:
        """Send one object as a frame (stdlib ``Connection.send``)."""
        try:
            self._send_frame(self.codec.pack(list(obj) if type(obj) is tuple else obj))
        except OSError as exc:
            self.close()
            raise translate_os_error(exc, self.endpoint, "call") from exc

    def recv(self) -> Any:
        """Receive one object (stdlib ``Connection.recv``)."""
        try:
            return self.codec.unpack(self._recv_frame(self.max_frame))
        except (OSError, EOFError) as exc:
            self.close()
            raise translate_os_error(exc, self.endpoint, "call") from exc

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def speaks_tls(address: tuple[str, int], timeout: float | None) -> bool:
    """Return whether the server at ``address`` answers a TLS ClientHello in TLS.

    Asked once a plain connection was closed at its first bytes (as a TLS server does;
    :func:`kvclient.errors.needs_tls_probe`), to say why: a second connection sends a
    ClientHello and reads the first two bytes of the answer, a TLS record's (handshake 0x16
    or alert 0x15, then version 0x03) or not. Nothing is verified or completed: only ssl's
    in-memory objects make the hello. Each step waits ``timeout`` seconds, 5 at most.
    """
    import ssl  # noqa: PLC0415 - only after a failure: a plain connection never loads it

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    session = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    try:
        session.do_handshake()
    except ssl.SSLWantReadError:
        pass  # the ClientHello is written, the answer awaited
    wait = 5.0 if timeout is None else min(timeout, 5.0)
    head = b""
    try:
        with socket.create_connection(address, wait) as sock:
            sock.sendall(outgoing.read())
            while len(head) < 2:
                chunk = sock.recv(2 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError:
        return False
    return len(head) == 2 and head[0] in (0x15, 0x16) and head[1] == 0x03
