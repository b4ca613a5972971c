"""What the Valkey/Redis backend keeps for retries, and how long (kvclient/_redis/_retention.py).

- A queue item leaves the queue only as a ``get``'s recorded answer; a waiting consumer waits
  on the queue's bell, not on its items. A consumer killed as it was woken (here: stopped
  while blocked, the item put, then killed: what a host that froze or died does), or one
  whose wait started long after its ``get`` script (stopped in between), holds no item: the
  next consumer gets it. An item answered is never put back.
- The request-id table of a container forgets a client thread's answer once that client's
  retry window has passed, so short-lived writers do not grow it for ever; a retry within
  the window still gets the recorded answer.

Real redis-server processes (standalone, and the 3-master cluster of tests/redis_cluster.py),
real client processes (tests/redis_retention_workers.py).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvclient._redis._backend import container_keys
from kvclient._redis._retention import MAX_REQUEST_IDS, windows
from kvclient._redis.scripts import scripts
from kvclient.retry import Retry
from tests.redis_cluster import available
from tests.redis_retention_workers import SHORT, short_retry

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

ROOT = Path(__file__).resolve().parent.parent
LEASE = windows(short_retry(), SHORT["timeout"], SHORT["call_timeout"]).in_flight / 1000
KEEP = windows(short_retry(), SHORT["timeout"], SHORT["call_timeout"]).request_ids / 1000


@pytest.fixture(params=["redis_standalone_url", "redis_cluster_url"], ids=["standalone", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    found: str = request.getfixturevalue(request.param)
    return found


@pytest.fixture
def r(url: str) -> Iterator[Any]:
    """A plain redis-py client of the same server or cluster, to look at the keys."""
    import redis
    from redis.cluster import RedisCluster

    if url.startswith("redis-cluster://"):
        host, port = url.removeprefix("redis-cluster://").split(",")[0].rsplit(":", 1)
        client: Any = RedisCluster(host=host, port=int(port))
    else:
        client = redis.Redis.from_url(url)
    yield client
    client.close()


class Worker:
    """A client process of tests/redis_retention_workers.py; its JSON lines, as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.redis_retention_workers", *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.lines: list[Any] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(json.loads(line))
                self._new.notify_all()

    def wait_lines(self, n: int, timeout: float) -> list[Any]:
        """Return the first ``n`` lines, waiting up to ``timeout`` seconds for them."""
        with self._new:
            assert self._new.wait_for(lambda: len(self.lines) >= n, timeout), self.lines
            return self.lines[:n]

    def finish(self, timeout: float) -> list[Any]:
        """Wait for the process to exit 0; return all its lines."""
        assert self.proc.wait(timeout) == 0
        self._reader.join(10)  # it drained the pipe
        return list(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


def _node(kv: kvclient.Client, name: str) -> Any:
    """A plain redis-py client of the node that serves container ``name``."""
    import redis

    host, port = kv._backend.nodes.node_for(container_keys(name)[0])  # type: ignore[attr-defined]
    return redis.Redis(host=host, port=port)


def _blocked(kv: kvclient.Client, name: str) -> list[dict[str, Any]]:
    """The connections blocked in a command on the node that serves queue ``name``."""
    with _node(kv, name) as node:
        return [c for c in node.client_list() if "b" in c["flags"]]


def _items(kv: kvclient.Client, name: str) -> dict[bytes, int]:
    """Every list among the keys of queue ``name`` but its bell, with its length: what holds
    items (the queue's own list, and any other a design would park items in)."""
    (_m, _r, _d, bell) = container_keys(name, "k")
    with _node(kv, name) as node:
        keys = node.keys(container_keys(name)[0][:-1] + b"*")
        return {k: node.llen(k) for k in keys if k != bell and node.type(k) == b"list"}


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


def stop(worker: Worker) -> None:
    """SIGSTOP ``worker`` and wait (bounded) until it is stopped: delivery is not at once."""
    os.kill(worker.proc.pid, signal.SIGSTOP)
    assert _until(lambda: _stopped(worker.proc.pid), 10)


def _until(condition: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.005)
    return bool(condition())


def first_in_line(
    url: str, kv: kvclient.Client, name: str, workers: list[Worker], behind: int, most: int = 0
) -> tuple[Worker, list[Worker]]:
    """A consumer stopped while first in line on queue ``name``, ``behind`` waiting after it.

    All with default settings (waits of 5 s); those behind get at most ``most`` items (0: no
    limit). The stopped one's wait is still on the server when this returns (it is taken
    again, at most 5 times, if the others took too long to line up).
    """
    for _attempt in range(5):
        victim = Worker("consume", url, name, "60")
        workers.append(victim)
        victim.wait_lines(1, 60)
        assert _until(lambda: _blocked(kv, name), 30)
        first = time.monotonic()  # its wait ends by first + 5 s
        stop(victim)
        others = [Worker("consume", url, name, "30", "0", str(most)) for _ in range(behind)]
        workers.extend(others)
        for w in others:
            w.wait_lines(1, 60)
        assert _until(lambda: len(_blocked(kv, name)) == 1 + behind, 30)
        if time.monotonic() < first + 4.0:
            return victim, others
        for w in [victim, *others]:
            w.kill()
    raise AssertionError(f"{behind} waiters were not in line within 4 s, 5 tries")


def test_an_item_a_killed_consumer_was_woken_for_goes_to_the_next_waiter(
    url: str, workers: list[Worker]
) -> None:
    """The first waiter in line is woken for the item and dies; the second still gets it.

    The item never leaves the queue for a consumer that is not answered: what the dead one
    took is the queue's bell, so the next waiter takes the item when its own wait (5 s by
    default) ends, and a new consumer at once.
    """
    with kvclient.connect(url) as kv:
        q = kv.queue("jobs")
        victim, (waiter,) = first_in_line(url, kv, "jobs", workers, 1)
        put = time.monotonic()
        q.put(["job", 1])
        assert q.qsize() == 1 and _items(kv, "jobs") == {container_keys("jobs")[2]: 1}
        victim.kill()
        assert waiter.wait_lines(2, 30) == ["ready", ["job", 1]]
        waited = time.monotonic() - put
        assert waited < 5 + 3, waited  # within the waiter's 5 s wait (and a loaded machine)
        assert victim.lines == ["ready"]
        assert q.qsize() == 0 and _items(kv, "jobs") == {}


def test_the_next_waiters_are_woken_at_once_after_a_dead_ones_bell(
    url: str, workers: list[Worker]
) -> None:
    """The first in line is woken for A and dies; B is put: both others answer in 2 s, not 5.

    B's put wakes the second waiter, which takes A and, as B is left, rings for the third
    (each of the two takes one item only, so the second cannot take B itself).
    """
    with kvclient.connect(url) as kv:
        q = kv.queue("jobs")
        victim, waiters = first_in_line(url, kv, "jobs", workers, 2, most=1)
        put = time.monotonic()
        q.put("A")
        q.put("B")
        got = sorted(w.wait_lines(2, 30)[1] for w in waiters)
        waited = time.monotonic() - put
        assert got == ["A", "B"]
        assert waited < 2.0, waited
        victim.kill()
        assert victim.lines == ["ready"]
        assert q.qsize() == 0 and _items(kv, "jobs") == {}


def test_an_item_answered_is_not_put_back(url: str, workers: list[Worker]) -> None:
    with kvclient.connect(url) as kv:
        q = kv.queue("once")
        consumer = Worker("consume", url, "once", "60", "1")
        workers.append(consumer)
        consumer.wait_lines(1, 60)
        assert _until(lambda: _blocked(kv, "once"), 30)
        q.put("only")
        assert consumer.wait_lines(2, 30)[1] == "only"
        assert _until(lambda: _blocked(kv, "once"), 30)  # in its next get
        consumer.kill()
        time.sleep(1.5)  # past its wait
        with pytest.raises(queue.Empty):
            q.get_nowait()
        assert q.qsize() == 0 and _items(kv, "once") == {}


def test_exact_totals_with_consumers_killed_as_they_were_woken(
    url: str, workers: list[Worker]
) -> None:
    """Two consumers die woken for an item each; 3 producers, 3 consumers: each item once."""
    with kvclient.connect(url) as kv:
        q = kv.queue("work")
        first, (second,) = first_in_line(url, kv, "work", workers, 1)
        stop(second)
        assert len(_blocked(kv, "work")) == 2
        for i in range(2):
            q.put(["woken", i])
        with _node(kv, "work") as node:
            assert node.llen(container_keys("work", "k")[3]) == 0  # each took a bell's token
        for victim in (first, second):
            victim.kill()
            assert victim.lines == ["ready"]
        assert q.qsize() == 2
        consumers = [Worker("consume", url, "work", "10") for _ in range(3)]
        producers = [Worker("produce", url, "work", f"p{i}", "150") for i in range(3)]
        workers.extend(consumers + producers)
        for p in producers:
            assert p.finish(120) == ["done"]
        got: Counter[str] = Counter()
        for c in consumers:
            lines = c.finish(120)
            assert lines[0] == "ready"
            got.update(json.dumps(item) for item in lines[1:])
        expected = [["woken", i] for i in range(2)]
        expected += [[f"p{p}", i] for p in range(3) for i in range(150)]
        assert got == Counter(json.dumps(item) for item in expected)  # none lost, none twice
        assert q.qsize() == 0 and _items(kv, "work") == {}


def test_waiters_are_woken_at_once_each_for_its_item(url: str) -> None:
    """Four waiters, four puts: every get answers within 2 s, not after its 5 s wait."""
    with kvclient.connect(url) as kv:
        q = kv.queue("many")
        got: list[tuple[Any, float]] = []

        def get() -> None:
            with kvclient.connect(url) as own:
                item = own.queue("many").get(timeout=30)
                got.append((item, time.monotonic()))

        for round_ in range(2):
            threads = [threading.Thread(target=get) for _ in range(4)]
            for t in threads:
                t.start()
            assert _until(lambda: len(_blocked(kv, "many")) == 4, 30)
            got.clear()
            began = time.monotonic()
            for i in range(4):
                q.put(i)
            for t in threads:
                t.join(30)
            assert sorted(item for item, _at in got) == [0, 1, 2, 3]
            assert max(at for _item, at in got) - began < 2.0, (round_, got, began)
        assert q.qsize() == 0 and _items(kv, "many") == {}


def test_a_consumer_whose_wait_starts_late_and_then_dies_loses_no_item(
    url: str, workers: list[Worker]
) -> None:
    """A consumer paused between its ``get`` script and its wait, for long, then killed.

    Its ``get`` script answered "wait"; the process stopped before it sent its blocking
    command (tests/redis_retention_workers.py stops itself there) for 1 s longer than the wait
    and the lease the earlier design gave it (the item then went into its in-flight list
    after that lease had ended, and was never reclaimed: stranded for ever); meanwhile
    another client's ``get`` ran. It goes on, blocks on the server, is stopped there, an item
    is put, and it is killed. Another consumer must get the item, once.
    """
    hold = 1.0 + LEASE  # a short-windows consumer's first wait (1 s), then its old lease
    with kvclient.connect(url) as kv:
        q = kv.queue("late")
        for _attempt in range(3):
            victim = Worker("consume_pausing", url, "late", "60")
            workers.append(victim)
            assert victim.wait_lines(2, 60) == ["ready", "pausing"]
            assert _until(functools.partial(_stopped, victim.proc.pid), 10)  # it stopped itself
            time.sleep(hold + 1.0)
            with pytest.raises(queue.Empty):
                q.get_nowait()  # any consumer's get, after that lease
            os.kill(victim.proc.pid, signal.SIGCONT)
            _until(lambda: _blocked(kv, "late"), 10)
            stop(victim)
            if _blocked(kv, "late"):  # still within its first wait (1 s) on the server
                break
            victim.kill()  # its first wait ended before it was stopped: again
        else:
            raise AssertionError("the consumer was not stopped within its first wait, 3 tries")
        q.put(["late", 1])
        time.sleep(0.2)
        victim.kill()
        assert victim.lines == ["ready", "pausing"]  # it never received the item
        taker = Worker("consume", url, "late", "10")
        workers.append(taker)
        got = taker.finish(60)
        assert got == ["ready", ["late", 1]], _items(kv, "late")  # once, not lost
        assert q.qsize() == 0 and _items(kv, "late") == {}


# -- request ids ---------------------------------------------------------------------------------


def _ids(r: Any, name: str) -> int:
    """How many request ids the container keeps (both generations)."""
    (_m, ids, *_rest) = container_keys(name)
    return int(r.hlen(ids)) + int(r.hlen(ids + b"0"))


def test_short_lived_writers_are_forgotten_after_their_window(
    url: str, r: Any, workers: list[Worker]
) -> None:
    """400 client threads write once each, in 4 rounds a window apart: the table keeps ~200."""
    clients = [kvclient.connect(url, **SHORT, retry=short_retry()) for _ in range(2)]
    try:
        d = clients[0].dict("hits")
        incr = clients[0]._backend._kinds["dict"]["incr"]  # type: ignore[attr-defined]

        def call(client: kvclient.Client) -> Any:
            """A call made once, to be retried later with its request id (as Retry does)."""
            return client._backend.new_call("dict", "hits", "incr")  # type: ignore[attr-defined]

        early = call(clients[0])
        assert incr(early, ["n"]) == 1
        sizes, n = [], 1
        for round_ in range(4):
            if round_:
                time.sleep(KEEP + 0.5)  # every writer's window so far has ended
            writers = [Worker("write_once", url, "hits", "25") for _ in range(4)]
            workers.extend(writers)
            for w in writers:
                assert w.finish(120) == ["done"]
            n += 100
            sizes.append(_ids(r, "hits"))
            if round_ == 1:
                # Two windows later its generation is gone: a retry that late applies again
                # (README: a retry later than its client's window may be).
                n += 1
                assert incr(early, ["n"]) == n
                mid = call(clients[1])
                n += 1
                assert incr(mid, ["n"]) == n
            if round_ == 2:
                # A window later, across a new generation: answered as first, not applied.
                assert incr(mid, ["n"]) == n - 100
        assert d["n"] == n == 403
        # Without forgetting: 101, 203, 303, 403; each round keeps its own 100 and the last's.
        assert 100 <= sizes[0] <= 101 and all(size <= 203 for size in sizes), sizes
    finally:
        for c in clients:
            c.close()


def test_one_generation_holds_at_most_65536_request_ids(redis_standalone_url: str) -> None:
    """As kvserve keeps at most 65,536 sessions: two generations of that many, at most."""
    import redis

    with (
        redis.Redis.from_url(redis_standalone_url) as r,
        kvclient.connect(redis_standalone_url) as kv,
    ):
        kv.queue("many")
        put = scripts("queue")["put"]
        r.script_load(put.text)
        keys = container_keys("many", "k", "o")
        total = 2 * MAX_REQUEST_IDS + 500
        for first in range(0, total, 5000):
            pipe = r.pipeline(transaction=False)
            for i in range(first, min(first + 5000, total)):
                pipe.evalsha(
                    put.sha, len(keys), *keys, "queue", f"{i:08x}:600000", "1", b"\x01", "0"
                )
            assert all(reply == [b"ok"] for reply in pipe.execute())
        (_m, ids, *_rest) = keys
        assert r.hlen(ids) <= MAX_REQUEST_IDS and r.hlen(ids + b"0") == MAX_REQUEST_IDS
        assert MAX_REQUEST_IDS < _ids(r, "many") <= 2 * MAX_REQUEST_IDS
        assert not r.hexists(ids + b"0", f"{0:08x}:600000")  # the first generations are gone
        assert r.hexists(ids, f"{total - 1:08x}:600000")
        assert kv.queue("many").qsize() == total  # and every put applied


def test_the_windows_follow_the_clients_settings(redis_standalone_url: str) -> None:
    """Default: 7.6 min for request ids, 54 s in flight; a new Retry renews every thread's token."""
    assert windows(Retry(), 10.0, 30.0) == (454_100, 54_100)
    assert windows(None, 1.0, 2.0) == (4_000, 4_000)
    assert windows(Retry(retries=2), None, 1.0).in_flight == 86_400_000  # a day at most
    with kvclient.connect(redis_standalone_url) as kv:
        backend: Any = kv._backend
        kv.dict("d").incr("n")
        assert backend.session().token.endswith(":454100")
        kv.retry = Retry(retries=20)
        assert backend.session().token.endswith(f":{windows(kv.retry, 10.0, 30.0).request_ids}")
        assert backend.windows == windows(kv.retry, 10.0, 30.0)
        assert kv.dict("d").incr("n") == 2
