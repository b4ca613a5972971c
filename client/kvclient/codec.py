"""The wire's values and framing constants, under the names kvclient has always exported.

Defined in :mod:`kvproto.codec` (values) and :mod:`kvproto.wire` (framing, messages).
"""

from __future__ import annotations

from kvproto.codec import (
    EXT_BIGINT,
    EXT_EXCEPTION,
    EXT_REF,
    EXT_TUPLE,
    MAX_DEPTH,
    MAX_EXT_DEPTH,
    STORED_DEPTH,
    Codec,
    Ref,
    check_key,
    encode_exception,
    too_deep,
)
from kvproto.wire import (
    CHALLENGE,
    FAILURE,
    HEADER,
    HELLO,
    MAX_BATCH,
    MAX_FRAME_DEFAULT,
    MAX_HANDSHAKE_FRAME,
    MAX_REPLY_FRAME,
    NONCE_SIZE,
    VERSION,
    WELCOME,
    WIRE_VERSION,
)

__all__ = [
    "CHALLENGE",
    "EXT_BIGINT",
    "EXT_EXCEPTION",
    "EXT_REF",
    "EXT_TUPLE",
    "FAILURE",
    "HEADER",
    "HELLO",
    "MAX_BATCH",
    "MAX_DEPTH",
    "MAX_EXT_DEPTH",
    "MAX_FRAME_DEFAULT",
    "MAX_HANDSHAKE_FRAME",
    "MAX_REPLY_FRAME",
    "NONCE_SIZE",
    "STORED_DEPTH",
    "VERSION",
    "WELCOME",
    "WIRE_VERSION",
    "Codec",
    "Ref",
    "check_key",
    "encode_exception",
    "too_deep",
]
