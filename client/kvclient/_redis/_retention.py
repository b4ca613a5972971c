"""How long the Valkey/Redis backend keeps what a client's retry may still need.

Two things on the server wait for a retry that may never come, because the client that would
send it died: the answer recorded under a request id (``kv{name}:r``), and a queue item a
blocked ``get`` moved into its in-flight list. Both are kept for a time derived from the
client's own settings (its :class:`~kvclient.retry.Retry`, ``timeout`` and ``call_timeout``),
so each client's entries last as long as that client can still retry (request ids: at most
about twice that):

- **request ids**: the whole retry window, every attempt taking its longest (connecting for
  ``timeout``, waiting ``call_timeout`` for the reply) plus the longest backoff between them.
  A retry later than that (only possible with a custom backoff whose waits vary by more than
  twice) may be applied again. The scripts keep request ids in two generations
  (``kv{name}:r`` and ``kv{name}:r0``, scripts/_prologue.lua): a client thread's first write
  in a generation may retire it, once the previous one has outlived the longest window of
  its writers, or once it holds ``MAX_REQUEST_IDS`` (as kvserve bounds its sessions). So
  the table holds about the client threads that wrote within two windows, at most twice
  ``MAX_REQUEST_IDS``, and a thread's further writes cost nothing extra.
- **in-flight queue items**: the backoff plus one attempt: long enough for a consumer whose
  connection failed after the ``BLMOVE`` to reconnect through a restart or failover and take
  its item; after that, the next ``get`` (any consumer's, the queue empty or not) puts the
  item back at the head of the queue and takes it. A
  later retry still gets an item exactly once (the item is in one place at any time: the
  queue, one in-flight list, or one recorded answer), just not necessarily the same one.

The request-id window travels in the token (``<hex>:<ms>``), so the scripts read it without
another argument on every call; the in-flight lease goes with the ``get`` that may block. Any
client with the password can send a hand-made token, so the scripts trust it no further than
this: a token over 64 bytes or a sequence number that is not up to 20 digits is refused (as
kvserve refuses one), a window that is not ``:<digits>`` at the token's end counts as 10
minutes, and one over :data:`MAX_WINDOW_MS` as that.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from kvclient.retry import Backoff, ConstantBackoff, ExponentialWithJitterBackoff, NoBackoff, Retry

__all__ = ["MAX_REQUEST_IDS", "MAX_WINDOW_MS", "Windows", "windows"]

MAX_REQUEST_IDS: Final = 65536
"""Most request ids in one generation of a container's (scripts/_prologue.lua has it too)."""

_FOREVER: Final = 86400.0  # a timeout of None (wait for ever) counts as a day

MAX_WINDOW_MS: Final = int(_FOREVER * 1000)
"""Longest window, in ms, of any client (a day); the scripts clamp a token's to it too."""
_MARGIN: Final = 1.0  # seconds added to both: the client's clock is not the server's


class Windows(NamedTuple):
    """Milliseconds the server keeps a client's request ids and its in-flight items."""

    request_ids: int
    in_flight: int


def _longest_wait(backoff: Backoff, failures: int) -> float:
    """The longest ``backoff`` may wait before retry number ``failures``."""
    if isinstance(backoff, ExponentialWithJitterBackoff):
        return float(min(backoff.cap, backoff.base * 2 ** min(failures, 32)))
    if isinstance(backoff, ConstantBackoff):
        return float(backoff.seconds)
    if isinstance(backoff, NoBackoff):
        return 0.0
    return 2.0 * backoff.compute(failures)  # a custom backoff: twice one of its waits


def windows(retry: Retry | None, timeout: float | None, call_timeout: float | None) -> Windows:
    """Return how long a client with these settings may still retry a call (see above)."""
    retries = 0 if retry is None else retry.retries
    backoff = (
        0.0
        if retry is None
        else sum(_longest_wait(retry.backoff, n) for n in range(1, retries + 1))
    )
    attempt = (_FOREVER if timeout is None else timeout) + (
        _FOREVER if call_timeout is None else call_timeout
    )

    def ms(seconds: float) -> int:
        return int(min(seconds + _MARGIN, _FOREVER) * 1000)  # at most MAX_WINDOW_MS

    return Windows(ms(backoff + (retries + 1) * attempt), ms(backoff + attempt))
