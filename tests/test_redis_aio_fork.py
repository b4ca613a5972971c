"""kvclient.aio on Valkey/Redis across ``fork``: a child's own client leaves the parent's alone.

The child inherits the parent's ``redis.asyncio`` connections and its event loop's epoll
instance (shared with the parent, not copied). When the child's garbage collector closed the
forgotten connections inside the child's own loop, ``EPOLL_CTL_DEL`` on that shared instance
took the parent's sockets out of the parent's loop, and the parent's next call on each waited
out its whole call timeout. Real redis-server, real fork.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import traceback

import pytest

import kvclient.aio
from tests.aio_adapter import SyncOverAsync
from tests.backends import in_ci
from tests.redis_cluster import available

_MISSING = available()
pytestmark = pytest.mark.skipif(
    _MISSING is not None and not in_ci(), reason=f"redis-server needed: {_MISSING}"
)

_CALL_TIMEOUT = 5.0  # a parent call that lost its socket waits this long, then fails or retries
_BOUND = 2.0


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    name = "redis_standalone_url" if request.param == "standalone" else "redis_cluster_url"
    url: str = request.getfixturevalue(name)
    return url


def _child(url: str) -> int:
    """Open, use and close a client of the child's own, collecting garbage inside its loop."""

    async def main() -> None:
        own = await kvclient.aio.connect(url)
        try:
            mine = await own.dict("fork")
            assert await mine.get("a") == 1
            gc.collect()  # the parent's forgotten connections, collected in a running loop
            await mine.set("b", 1)
        finally:
            await own.close()

    asyncio.run(main())
    return 0


def test_a_forked_childs_own_client_leaves_the_parents_connections_working(
    redis_url: str,
) -> None:
    parent = SyncOverAsync(redis_url, None, call_timeout=_CALL_TIMEOUT)
    try:
        shared = parent.dict("fork")
        shared["a"] = 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                code = _child(redis_url)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child did not finish in 60 s")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        started = time.monotonic()
        shared["a"] = 2  # one write per master the parent has a connection to
        assert shared["a"] == 2
        elapsed = time.monotonic() - started
        assert elapsed < _BOUND, f"the parent's calls took {elapsed:.1f} s after the fork"
    finally:
        parent.close()
