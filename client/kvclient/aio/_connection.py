"""One authenticated asyncio connection: streams, the handshake, one call at a time.

An :class:`AsyncConnection` is the asyncio twin of :class:`kvclient.connection.Connection`:
the same :class:`~kvproto.handshake.ClientHandshake`, the same framing
(:func:`~kvproto.wire.frame_parts`, :class:`~kvproto.wire.FrameDecoder`) and the same
:class:`~kvproto.codec.Codec` setup, over ``asyncio.open_connection``. It carries one call at
a time (the pool in :mod:`kvclient.aio._backend` gives concurrent calls a connection each).
Any failure, timeout or cancellation in the middle of a call closes it: a late reply can then
never be read as the answer to a later call, and the server, seeing the connection go,
withdraws a call it had parked for it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from kvproto.codec import MAX_DEPTH, Codec, Ref
from kvproto.errors import (
    AuthError,
    KVConnectionError,
    KVTimeoutError,
    ProtocolError,
    TLSError,
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
            return await _open(address, endpoint, authkey, codec, tls)
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
) -> AsyncConnection:
    try:
        reader, writer = await asyncio.open_connection(
            address[0], address[1], ssl=tls, server_hostname=address[0] if tls else None
        )
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(
            f"the certificate of {endpoint} was refused ({exc.verify_message}); "
            "check the CA (ca= or KV_TLS_CA), the host name and the certificate dates"
        ) from None
    except ssl.SSLError as exc:
        raise TLSError(
            f"TLS handshake with {endpoint} failed ({_reason(exc)}); is kvserve "
            "serving TLS there (--tls-cert)?"
        ) from None
    except (ConnectionError, OSError) as exc:
        if tls is not None and isinstance(exc, ConnectionResetError):
            raise TLSError(
                f"TLS handshake with {endpoint} failed ({_reason(exc)}); is kvserve "
                "serving TLS there (--tls-cert)?"
            ) from None
        raise translate_os_error(exc, endpoint, "connect to") from exc
    conn = AsyncConnection(reader, writer, endpoint, codec, tls is not None)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        tune_socket(sock)
    try:
        await conn._handshake(authkey)
    except BaseException:
        conn.close()
        raise
    return conn


class AsyncConnection:
    """A connected, authenticated stream pair speaking kvmanager frames (see the module)."""

    __slots__ = ("_decoder", "_frames", "_reader", "_tls", "_writer", "codec", "endpoint")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        endpoint: str,
        codec: Codec,
        tls: bool,
    ) -> None:
        self._reader: asyncio.StreamReader | None = reader
        self._writer = writer
        self._tls = tls
        self._decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self._frames: list[bytes] = []
        self.endpoint = endpoint
        self.codec = codec

    @property
    def closed(self) -> bool:
        """True once the connection is closed; it cannot be reopened."""
        return self._reader is None

    def close(self) -> None:
        """Close at once (abort: nothing buffered is sent). Safe to call more than once."""
        if self._reader is None:
            return
        self._reader = None
        transport = self._writer.transport
        # abort(), not close(): a call being cancelled must not have its request flushed
        # after the fact, and the server must see the connection go now (it withdraws the
        # call it parked for it).
        transport.abort()

    async def _handshake(self, authkey: bytes) -> None:
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
        except ssl.SSLError as exc:
            text = str(exc).upper()
            if "CERTIFICATE_REQUIRED" in text or "CERTIFICATE REQUIRED" in text:
                raise TLSError(
                    f"{self.endpoint} requires a client certificate; pass cert= and key= "
                    "(or KV_TLS_CERT and KV_TLS_KEY)"
                ) from None
            if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
                raise TLSError(
                    f"{self.endpoint} refused this client's certificate ({_reason(exc)}); it "
                    "must be signed by the CA the server trusts (its --tls-ca)"
                ) from None
            raise TLSError(
                f"TLS session with {self.endpoint} failed during the handshake "
                f"({_reason(exc)}); if the server requires client certificates (--tls-ca), "
                "pass cert= and key= (or KV_TLS_CERT and KV_TLS_KEY)"
            ) from None
        except (EOFError, ConnectionResetError, BrokenPipeError) as exc:
            if self._tls:
                # As the blocking client finds it: a server refusing our certificate may
                # reset the connection before its alert is read.
                raise TLSError(
                    f"TLS session with {self.endpoint} failed during the handshake "
                    f"({_reason(exc)}); if the server requires client certificates "
                    "(--tls-ca), pass cert= and key= (or KV_TLS_CERT and KV_TLS_KEY)"
                ) from None
            raise KVConnectionError(
                f"{self.endpoint} closed the connection during the handshake (is it kvserve? "
                "at its --max-connections limit?); if it serves TLS, connect with tls=True "
                "(or KV_TLS_CA)"
            ) from exc
        except OSError as exc:
            raise translate_os_error(exc, self.endpoint, "connect to") from exc
        self._decoder.limit = MAX_REPLY_FRAME

    def _send(self, payload: bytes) -> None:
        for part in frame_parts(payload):
            self._writer.write(part)

    async def _recv(self) -> bytes:
        while not self._frames:
            reader = self._reader
            if reader is None:
                raise EOFError
            data = await reader.read(_READ_CHUNK)
            if not data:
                raise EOFError
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)

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
        if self._reader is None:
            raise KVConnectionError(f"connection to {self.endpoint} is closed")
        try:
            self._send(payload)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
                frame = await self._recv()
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
        if self._frames:
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


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
