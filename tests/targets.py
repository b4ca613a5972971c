"""More clients of the implementation a test's `kv` talks to: in the test process or in workers.

A `Target` is what a client needs to reach the store `kv` uses: the implementation's id in
`tests/backends.py`, the address its `start` returned and the test's authkey. It pickles, so a
worker process gets one as its argument and connects through the same `Implementation.connect`
as the test (`with target.connect() as kv: ...`), whichever implementation that is.

This module imports neither pytest nor the registry: worker modules import it cheaply. The
registry (and with it pytest) is imported by the first `connect`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from types import TracebackType

import kvclient


@dataclass(frozen=True)
class Target:
    """Where another client of a test's implementation connects; picklable for workers."""

    implementation: str
    address: str
    authkey: bytes

    def connect(self) -> AbstractContextManager[kvclient.Client]:
        """Connect a new client through the implementation's own `connect`."""
        from tests import backends

        return backends.by_id()[self.implementation].connect(self.address, self.authkey)


class ClientFactory:
    """Opens clients of one `Target` (each another owner); `close` closes every one opened."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._opened = ExitStack()

    def __call__(self) -> kvclient.Client:
        return self._opened.enter_context(self.target.connect())

    def close(self) -> None:
        self._opened.close()

    def __enter__(self) -> ClientFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
