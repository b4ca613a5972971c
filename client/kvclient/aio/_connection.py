"""One authenticated asyncio connection: streams, the handshake, one call at a time.

An :class:`AsyncConnection` is the asyncio twin of :class:`kvclient.connection.Connection`:
the same :class:`~kvproto.handshake.ClientHandshake`, the same framing
(:func:`~kvproto.wire.frame_parts`, :class:`~kvproto.wire.FrameDecoder`) and the same
:class:`~kvproto.codec.Codec` setup, over an asyncio transport and a small protocol
(:class:`_FrameProtocol`) that feeds the decoder as bytes arrive and wakes the one call
waiting. Not streams: ``StreamReader.read`` makes a future per read, ``drain`` is a coroutine
per call and ``asyncio.timeout`` several calls more; a call here is one future and, with a
timeout, one timer handle. It carries one call at a time (the pool in
:mod:`kvclient.aio._backend` gives concurrent calls a connection each).
Any failure, timeout or cancellation in the middle of a call closes it: a late reply can then
never be read as the answer to a later call, and the server, seeing the connection go,
withdraws a call it had parked for it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from kvclient.connection import speaks_tls
from kvclient.errors import needs_tls_probe, translate_handshake_error
from kvproto.codec import MAX_DEPTH, Codec, Ref
from kvproto.errors import (
    AuthError,
    KVConnectionError,
    KVTimeoutError,
    ProtocolError,
    translate_os_error,
)
from kvproto.handshake import ClientHandshake
from kvproto.net import format_address, tune_socket
from kvproto.wire import (
    MAX_HANDSHAKE_FRAME,
    MAX_REPLY_FRAME,
    RETURN,
    FrameDecoder,
    FrameTooLargeError,
    MalformedReplyError,
    frame_parts,
    unwrap_reply,
)

__all__ = ["AsyncConnection", "open_connection"]

_READ_CHUNK = 64 * 1024


async def open_connection(
    address: tuple[str, int],
    authkey: bytes,
    timeout: float | None,
    codec: Codec,
    tls: ssl.SSLContext | None = None,
) -> AsyncConnection:
    """Connect, (TLS,) authenticate; return the connection.

    Args:
        address: ``(host, port)``.
        authkey: the shared key.
        timeout: seconds for connecting and the handshake; None waits for ever.
        codec: encodes requests and decodes replies (shared by a client's connections).
        tls: a client TLS context (the host name is checked), or None for plain TCP.

    Raises:
        KVConnectionError, KVTimeoutError: unreachable, or it closed during the handshake.
        AuthError, ProtocolError, TLSError: as the blocking connection raises them.
    """
    endpoint = format_address(*address)
    try:
        async with asyncio.timeout(timeout):
            return await _open(address, endpoint, authkey, codec, tls, timeout)
    except TimeoutError as exc:
        if isinstance(exc, KVConnectionError):
            raise
        raise KVTimeoutError(f"timed out trying to connect to {endpoint}") from None


async def _open(
    address: tuple[str, int],
    endpoint: str,
    authkey: bytes,
    codec: Codec,
    tls: ssl.SSLContext | None,
    timeout: float | None,
) -> AsyncConnection:
    try:
        transport, protocol = await asyncio.get_running_loop().create_connection(
            _FrameProtocol,
            address[0],
            address[1],
            ssl=tls,
            server_hostname=address[0] if tls else None,
        )
    except OSError as exc:  # ssl.SSLError is one
        if tls is None:
            raise translate_os_error(exc, endpoint, "connect to") from exc
        raise translate_handshake_error(exc, endpoint, stage="tls", tls=True) from exc
    conn = AsyncConnection(transport, protocol, endpoint, codec, tls is not None)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        tune_socket(sock)
    try:
        await conn._handshake(authkey, address, timeout)
    except BaseException:
        conn.close()
        raise
    return conn


class _FrameProtocol(asyncio.BufferedProtocol):
    """Cut the bytes received into frames; wake the call waiting; note why it ended.

    Buffered: the transport reads into one buffer per connection, reused. A plain Protocol
    gets a new bytes object per read, allocated at asyncio's 256 KiB read size: an mmap, an
    mremap and a munmap per reply (most of a single caller's CPU time per call).
    """

    def __init__(self) -> None:
        self._view = memoryview(bytearray(_READ_CHUNK))
        self.decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self.frames: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None  # why no more frames will come
        self._drained: asyncio.Future[None] | None = None
        self._paused = False

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self.decoder.feed(self._view[:nbytes])
        except FrameTooLargeError as exc:
            self.error = exc
            self._wake()
            return
        if frames:
            self.frames.extend(frames)
            self._wake()

    def eof_received(self) -> bool:
        if self.error is None:
            self.error = EOFError()
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = exc if exc is not None else EOFError()
        self._wake()
        self._resume()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._resume()

    def _resume(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark again."""
        while self._paused and self.error is None:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class AsyncConnection:
    """A connected, authenticated transport speaking kvmanager frames (see the module)."""

    __slots__ = ("_loop", "_protocol", "_tls", "_transport", "closed", "codec", "endpoint")

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        protocol: _FrameProtocol,
        endpoint: str,
        codec: Codec,
        tls: bool,
    ) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._protocol = protocol
        self._tls = tls
        self._loop = asyncio.get_running_loop()
        self.closed = False  # once closed, never reopened (the pool opens a new one)
        self.endpoint = endpoint
        self.codec = codec

    def close(self) -> None:
        """Close at once (abort: nothing buffered is sent). Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        # abort(), not close(): a call being cancelled must not have its request flushed
        # after the fact, and the server must see the connection go now (it withdraws the
        # call it parked for it).
        self._transport.abort()

    async def _handshake(
        self, authkey: bytes, address: tuple[str, int], timeout: float | None
    ) -> None:
        handshake = ClientHandshake(authkey)
        try:
            self._send(handshake.hello)
            challenge = await self._recv()
            self._send(handshake.on_challenge(challenge))
            try:
                handshake.on_welcome(await self._recv())
            except AuthError as exc:
                raise AuthError(f"{self.endpoint}: {exc}") from None
        except FrameTooLargeError:
            raise ProtocolError(
                f"{self.endpoint} does not speak the kvmanager protocol; is that address a "
                "kvserve server?"
            ) from None
        except (EOFError, OSError) as exc:  # OSError: ssl.SSLError too
            # In a thread (a few ms; the connect timeout, 5 s at most, per step).
            probe = needs_tls_probe(exc, self._tls) and await asyncio.to_thread(
                speaks_tls, address, timeout
            )
            raise translate_handshake_error(
                exc, self.endpoint, stage="hello", tls=self._tls, expects_tls=probe
            ) from exc
        self._protocol.decoder.limit = MAX_REPLY_FRAME

    def _send(self, payload: bytes) -> None:
        self._transport.writelines(frame_parts(payload))

    async def _recv(self, timeout: float | None = None) -> bytes:
        """Return the next frame, waiting at most ``timeout`` seconds (None: for ever).

        Raises: EOFError or what closed it (OSError, ssl.SSLError, FrameTooLargeError);
        TimeoutError.
        """
        protocol = self._protocol
        frames = protocol.frames
        while not frames:
            if self.closed:
                raise EOFError
            error = protocol.error
            if error is not None:
                raise error
            waiter = protocol.waiter = self._loop.create_future()
            timer = None if timeout is None else self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                protocol.waiter = None
                if timer is not None:
                    timer.cancel()
        return frames.popleft()

    async def call(self, message: list[Any], timeout: float | None) -> Any:
        """Send one request and return its result, raising what the server raised.

        Args:
            message: ``[ident, method, args, kwds(, request id)]``.
            timeout: seconds to wait for the reply; None waits for ever.

        Raises:
            TypeError: a value cannot be encoded (nothing was sent).
            KVConnectionError, KVTimeoutError: the connection failed or timed out (closed).
            ProtocolError: the reply was not understood (closed).
            asyncio.CancelledError: the task was cancelled (closed).
        """
        payload = self.codec.pack(message)
        if self.closed:
            raise KVConnectionError(f"connection to {self.endpoint} is closed")
        protocol = self._protocol
        try:
            self._send(payload)
            if protocol._paused:
                # A large request fills the buffer: its sending counts against the timeout.
                start = self._loop.time()
                async with asyncio.timeout(timeout):
                    await protocol.drain()
                if timeout is not None:
                    timeout = max(0.0, timeout - (self._loop.time() - start))
            frame = await self._recv(timeout)
            reply = self.codec.unpack(frame)
        except TimeoutError as exc:
            self.close()
            raise KVTimeoutError(f"timed out trying to call {self.endpoint}") from exc
        except (OSError, EOFError) as exc:
            self.close()
            raise translate_os_error(exc, self.endpoint, "call") from exc
        except FrameTooLargeError as exc:
            self.close()
            raise ProtocolError(
                f"{self.endpoint} sent a {exc.size}-byte frame, over the {exc.limit}-byte limit"
            ) from None
        except BaseException:
            # Cancelled, or a frame that does not decode: the reply (if any) is still in
            # flight, and reading it later would pair it with the wrong call.
            self.close()
            raise
        if protocol.frames:
            self.close()
            raise ProtocolError(f"{self.endpoint} sent more than one reply")
        if type(reply) is list and len(reply) == 2 and reply[0] == RETURN:
            return reply[1]
        try:
            return unwrap_reply(reply)
        except KVConnectionError:
            self.close()  # the server is going away; the next call reconnects
            raise
        except MalformedReplyError:
            self.close()
            raise ProtocolError(f"malformed reply from {self.endpoint}") from None


def make_codec(
    make_ref: Callable[[Ref], Any] | None, to_ref: Callable[[Any], Ref | None] | None
) -> Codec:
    """Return the codec a client's connections share (the blocking connection's setup)."""
    return Codec(make_ref, to_ref, encode_depth=MAX_DEPTH, decode_depth=None)
