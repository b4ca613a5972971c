"""The durability policy: no reply leaves before the log holds the writes it acknowledges.

With ``--data-dir``, every reply of a loop iteration is *held* here; at the end of the
iteration the log is flushed once (one write, and under ``--fsync always`` one fsync, for every
client served in it: group commit) and only then are the held replies released. If the flush
fails, the writes are applied in memory but not on disk: their replies are never sent, and the
server stops (a restart replays what the log holds).

This module knows the log (:class:`~kvserve.persistence.Persistence`) and nothing of sockets:
the loop hands it a way to send a reply, to wait for more requests, and to fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from kvserve.persistence import Persistence
from kvserve.store import Store

__all__ = ["HeldReplies"]

C = TypeVar("C")


class HeldReplies(Generic[C]):
    """Replies waiting for the log, per connection ``C``, in the order they were made.

    Args:
        persistence: the open log.
        store: what a compaction snapshots (after a release, when the log asks for one).
    """

    def __init__(self, persistence: Persistence, store: Store) -> None:
        self.persist = persistence
        self.store = store
        self.held: list[tuple[C, bytes]] = []
        self._last_group = 0  # writers in the last group commit (--fsync always)

    def __bool__(self) -> bool:
        return bool(self.held)

    def hold(self, conn: C, payload: bytes) -> None:
        """Keep ``payload`` for ``conn`` until the next :meth:`release`."""
        self.held.append((conn, payload))

    def _group(self) -> int:
        return len({id(conn) for conn, _ in self.held})

    def gather(self, poll: Callable[[float], None]) -> None:
        """Under ``--fsync always``, wait a moment for writers missing from this group.

        Group commit shares one fsync among the writes handled in one loop iteration. Clients
        do not arrive in lockstep, so a group often closes one straggler short (4 writers
        split 3 + 1, two fsyncs). Like PostgreSQL's commit_delay, wait up to half the last
        fsync (at most 2 ms) when the previous group was larger than this one; a single writer
        never waits.

        Args:
            poll: handle whatever arrives within the given seconds (the loop's select).
        """
        if self.persist.fsync != "always":
            return
        group = self._group()
        if group >= self._last_group:
            self._last_group = group
            return
        deadline = time.monotonic() + min(0.002, self.persist.last_sync_seconds / 2)
        while group < self._last_group:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            poll(left)
            group = self._group()
        self._last_group = group

    def release(
        self, send: Callable[[C, bytes], None], fail: Callable[[list[C], str], None]
    ) -> None:
        """Make the log hold every applied write, then send the replies that wait on it.

        Args:
            send: send one reply now.
            fail: the log could not be written: called with the connections whose replies
                are dropped and why; the loop closes them and stops.
        """
        held, self.held = self.held, []
        try:
            self.persist.flush()
        except OSError as exc:
            # The writes are applied in memory but not logged: acknowledging them would be a
            # lie. Fail those calls loudly and stop; a restart replays what the log holds.
            fail([conn for conn, _ in held], str(self.persist.failed or exc))
            return
        for conn, payload in held:
            send(conn, payload)
        if self.persist.should_compact():
            try:
                self.persist.compact(self.store)
            except OSError:
                pass  # logged and counted by Persistence; a failed log write stops us next time
