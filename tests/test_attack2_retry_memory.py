"""attack2: request-id memory must survive a compaction followed by a restart."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.test_faults_wire import Target, _request, make_target  # noqa: F401
from tests.wire import authed_connection

pytestmark = pytest.mark.timeout(60)


def test_attack2_a_retried_incr_after_compaction_and_restart_is_not_applied_twice(
    make_target: Callable[..., Target],  # noqa: F811
) -> None:
    target = make_target(data=True)
    token = b"attack2-session-1"
    with target.client() as kv:
        kv.value("counter", "i", 0)
    sock = authed_connection(target.address, target.authkey)
    first = _request(sock, ["counter", "incr", [1], None, [token, 1]])
    assert first == ["#RETURN", 1]
    # The reply above is "lost"; meanwhile the log is compacted (as --compact-at does on its
    # own), then the server restarts.
    sock.close()
    with target.client() as kv:  # another session: the token's last answer stays seq 1
        assert kv.compact()
        deadline = time.monotonic() + 10
        while kv.stats()["persistence"]["compacting"] and time.monotonic() < deadline:
            time.sleep(0.05)
    target.restart()
    sock = authed_connection(target.address, target.authkey)
    retried = _request(sock, ["counter", "incr", [1], None, [token, 1]])
    sock.close()
    with target.client() as kv:
        value = kv.value("counter", "i", 0).value
    assert value == 1, f"the retried incr was applied twice: {retried}"
    target.assert_serving()
