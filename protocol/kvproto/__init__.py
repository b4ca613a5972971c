"""kvproto: the kvmanager protocol, shared by kvserve and kvclient. No I/O, nothing else of ours.

=====================  ===================================================================
module                 what it defines
=====================  ===================================================================
:mod:`kvproto.wire`    framing, the handshake's bytes, request and reply shapes: the wire
:mod:`kvproto.codec`   values inside messages (msgpack, ext types, depth and key limits)
:mod:`kvproto.schema`  what each (kind, operation) is: mutating, blocking, its wait argument
:mod:`kvproto.handshake`  both sides of the HMAC handshake, as state machines
:mod:`kvproto.errors`  the exception tree and its translation from socket errors
:mod:`kvproto.authkey`  where the authkey comes from, and what key a server refuses
:mod:`kvproto.address`  the address forms (``HOST:PORT``, ``kv://``, ``kvs://``)
:mod:`kvproto.tls`     TLS contexts with safe defaults
:mod:`kvproto.net`     socket options both ends set
=====================  ===================================================================

Importing this package loads nothing but the version: ``kvctl``'s fast path imports only the
modules it uses.
"""

from __future__ import annotations

from kvproto._version import __version__

__all__ = ["__version__"]
