"""Watch: revisions, change events in order, resume from a revision, bounded history.

The tests taking only `kv` (and `kv2`, `kv_target`) are conformance tests: every implementation
runs them. Those about kvserve's retention flags and its restart start `kvserve` processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import kvclient
import kvclient.aio
from kvclient import CompactedError, Event
from tests.conftest import read_listening_line, start_kvserve
from tests.targets import Target
from tests.watch_workers import incr_worker

FORKSERVER = mp.get_context("forkserver")


def test_every_change_is_one_revision_and_one_event_per_key(kv: kvclient.Client) -> None:
    d = kv.dict("cfg")
    assert d.revision() == 0
    d["a"] = 1
    d.update({"b": 2, "c": 3})
    del d["a"]
    d.incr("b", 5)
    assert d.cas("c", 3, 4) is True
    assert d.cas("c", 99, 5) is False
    d.clear()
    # The cas that did not match succeeded as a call: it takes revision 6, with no event.
    assert d.revision() == 7
    events = list(d.watch(since=0, timeout=0))
    assert events == [
        Event(1, "set", "a", 1),
        Event(2, "set", "b", 2),
        Event(2, "set", "c", 3),
        Event(3, "delete", "a", None),
        Event(4, "set", "b", 7),
        Event(5, "set", "c", 4),
        Event(7, "clear", None, None),
    ]


def test_a_failed_call_is_not_a_change(kv: kvclient.Client) -> None:
    d = kv.dict("failed")
    d["x"] = 1
    with pytest.raises(KeyError):
        del d["missing"]
    with pytest.raises(TypeError):
        d.incr("x", "one")  # type: ignore[arg-type]
    assert d.revision() == 1
    assert [e.revision for e in d.watch(0, timeout=0)] == [1]


def test_watch_resumes_after_a_revision_without_losing_or_repeating(kv: kvclient.Client) -> None:
    d = kv.dict("resume")
    for i in range(10):
        d[f"k{i}"] = i
    first = d.watch(since=0, timeout=0)
    seen = [next(first) for _ in range(4)]
    assert first.revision == 4
    rest = list(d.watch(since=first.revision, timeout=0))
    assert [e.revision for e in seen + rest] == list(range(1, 11))
    assert [e.key for e in rest] == [f"k{i}" for i in range(4, 10)]


def test_revision_of_a_split_change_is_resumable_mid_way(kv: kvclient.Client) -> None:
    d = kv.dict("split")
    d.update({"a": 1, "b": 2, "c": 3})
    w = d.watch(since=0, timeout=0)
    assert next(w).key == "a"
    assert w.revision == 0  # the rest of revision 1 is still to come
    assert [e.key for e in d.watch(since=w.revision, timeout=0)] == ["a", "b", "c"]
    assert [e.key for e in w] == ["b", "c"]
    assert w.revision == 1


def test_watch_without_since_starts_now_and_waits_for_a_change(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    d = kv.dict("live")
    d["old"] = 0
    w = d.watch(timeout=30)

    def write() -> None:
        time.sleep(0.3)
        kv2.dict("live")["new"] = 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert next(w) == Event(2, "set", "new", 1)
    finally:
        writer.join(10)
    assert w.revision == 2


def test_watch_with_a_timeout_stops_when_nothing_changes(kv: kvclient.Client) -> None:
    d = kv.dict("quiet")
    start = time.monotonic()
    assert list(d.watch(timeout=0.3)) == []
    assert time.monotonic() - start < 20  # generous: it ended by the timeout


def test_key_and_prefix_filters(kv: kvclient.Client) -> None:
    d = kv.dict("filtered")
    d["config"] = 1
    d["config.db"] = 2
    d["other"] = 3
    d[7] = 4
    d.clear()
    assert [(e.op, e.key) for e in d.watch(0, key="config", timeout=0)] == [
        ("set", "config"),
        ("clear", None),
    ]
    assert [e.key for e in d.watch(0, prefix="config", timeout=0)] == ["config", "config.db", None]
    w = d.watch(0, key="nothing", timeout=0)
    assert [e.op for e in w] == ["clear"]
    assert w.revision == 5


def test_a_filtered_watch_still_advances_its_revision(kv: kvclient.Client) -> None:
    d = kv.dict("advance")
    for i in range(5):
        d[f"x{i}"] = i
    w = d.watch(0, key="y", timeout=0)
    assert list(w) == []
    assert w.revision == 5


def test_list_namespace_and_queue_are_watched_too(kv: kvclient.Client) -> None:
    lst = kv.list("l")
    lst.append("a")
    lst.extend(["b", "c"])
    lst[0] = "z"
    lst.sort()
    assert [(e.op, e.key, e.value) for e in lst.watch(0, timeout=0)] == [
        ("append", None, "a"),
        ("append", None, "b"),
        ("append", None, "c"),
        ("set", 0, "z"),
        ("sort", None, None),
    ]
    ns = kv.namespace("ns")
    ns.x = 1
    ns.incr("x")
    del ns.x
    assert [(e.op, e.key, e.value) for e in ns.watch(0, timeout=0)] == [
        ("set", "x", 1),
        ("set", "x", 2),
        ("delete", "x", None),
    ]
    q = kv.queue("q")
    q.put("job")
    assert q.get() == "job"
    q.task_done()
    assert [(e.op, e.value) for e in q.watch(0, timeout=0)] == [
        ("put", "job"),
        ("get", "job"),
        ("task_done", None),
    ]


def test_a_watch_parked_behind_a_blocked_get_sees_the_change(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    # A get parked on an empty queue holds the queue's line; a watch parked after it must
    # still be woken by a change that does not end the get.
    q = kv.queue("line")
    q.put("a")
    assert q.get() == "a"
    got: list[Any] = []
    getter = threading.Thread(target=lambda: got.append(kv.queue("line").get(timeout=30)))
    getter.start()
    time.sleep(0.3)
    watch = kv2.queue("line").watch(since=2, timeout=30)
    box: list[Event] = []
    watcher = threading.Thread(target=lambda: box.append(next(watch)))
    watcher.start()
    time.sleep(0.3)
    kv2.queue("line").task_done()  # a change; the get still blocks
    watcher.join(20)
    assert box == [Event(3, "task_done", None, None)]
    kv2.queue("line").put("b")
    getter.join(20)
    assert got == ["b"]


def test_a_parked_filtered_watch_outlives_a_history_of_other_changes(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    # A watch of one key, parked while more changes to other keys than the history keeps
    # (1,000 by default) go by: it skipped them, so it must neither fall behind the history
    # (CompactedError) nor miss the change to its key that comes after.
    d = kv.dict("busy")
    d["quiet"] = 0
    since = d.revision()
    watch = kv2.dict("busy").watch(since=since, key="quiet", timeout=60)
    box: list[Any] = []

    def follow() -> None:
        try:
            box.append(next(watch))
        except Exception as exc:  # the assertion below shows it
            box.append(exc)

    watcher = threading.Thread(target=follow)
    watcher.start()
    time.sleep(0.3)
    for start in range(0, 1200, 400):
        with kv.batch() as batch:
            busy = batch.dict("busy")
            for i in range(start, start + 400):
                busy.set(f"k{i}", i)
    d["quiet"] = 1
    watcher.join(30)
    assert box == [Event(since + 1201, "set", "quiet", 1)]


def test_bad_watch_arguments_are_refused(kv: kvclient.Client) -> None:
    d = kv.dict("bad")
    with pytest.raises(TypeError):
        d.watch(since=-1)
    with pytest.raises(ValueError):
        d.watch(since=0, limit=0)
    with pytest.raises(ValueError):
        d.watch(since=0, limit=10_000)
    with pytest.raises(ValueError):
        list(d.watch(since=0, timeout=float("nan")))
    with pytest.raises(TypeError):
        list(d.watch(since=0, prefix=1, timeout=0))  # type: ignore[arg-type]


def test_since_ahead_of_the_revision_raises_compacted(kv: kvclient.Client) -> None:
    d = kv.dict("ahead")
    d["a"] = 1
    with pytest.raises(CompactedError) as info:
        list(d.watch(since=50, timeout=0))
    assert info.value.revision == 1
    assert info.value.oldest == 0


def test_a_dropped_container_ends_its_watchers(kv: kvclient.Client, kv2: kvclient.Client) -> None:
    d = kv.dict("dropme")
    w = d.watch(timeout=30)
    box: list[BaseException] = []

    def watch() -> None:
        try:
            next(w)
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.3)
    kv2.drop("dropme")
    t.join(20)
    assert len(box) == 1 and isinstance(box[0], kvclient.NoSuchContainerError)


def test_exact_events_from_several_writer_processes(kv: kvclient.Client, kv_target: Target) -> None:
    n_procs, n_ops = 4, 100
    d = kv.dict("counts")
    start = d.revision()
    workers = [
        FORKSERVER.Process(target=incr_worker, args=(kv_target, "counts", w, n_ops))
        for w in range(n_procs)
    ]
    for w in workers:
        w.start()
    events: list[Event] = []
    watch = d.watch(since=start, timeout=30)
    for event in watch:
        events.append(event)
        if len(events) == 2 * n_procs * n_ops:
            break
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert [e.revision for e in events] == list(range(1, 2 * n_procs * n_ops + 1))
    totals = [e.value for e in events if e.key == "total"]
    assert totals == list(range(1, n_procs * n_ops + 1))  # each increment seen once, in order
    for n in range(n_procs):
        assert [e.value for e in events if e.key == f"w{n}"] == list(range(1, n_ops + 1))
    assert list(d.watch(since=watch.revision or 0, timeout=0)) == []


def test_asyncio_watch_is_an_async_iterator(kv_target: Target, kv: kvclient.Client) -> None:
    if not kv_target.implementation.startswith("kvserve"):
        pytest.skip("kvclient.aio speaks to kvserve")
    d = kv.dict("aio")
    d["a"] = 1

    async def main() -> list[Event]:
        async with kvclient.aio.connect(kv_target.address, kv_target.authkey) as akv:
            ad = await akv.dict("aio")
            assert await ad.revision() == 1
            got = [e async for e in ad.watch(since=0, timeout=0)]
            watch = ad.watch(timeout=20)

            async def write() -> None:
                await asyncio.sleep(0.2)
                await ad.set("b", 2)

            task = asyncio.create_task(write())
            got.append(await watch.__anext__())
            await task
            assert watch.revision == 2
            return got

    assert asyncio.run(main()) == [Event(1, "set", "a", 1), Event(2, "set", "b", 2)]


# -- kvserve: retention, memory, restarts ---------------------------------------------------


def _start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = start_kvserve(env, *args)
    return proc, read_listening_line(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.communicate(timeout=30)


def _compacted(kv: kvclient.Client) -> None:
    """Compact the log into a snapshot and wait (up to 30 s) until it is written."""
    assert kv.compact()
    deadline = time.monotonic() + 30
    while kv.stats()["persistence"]["compactions"] < 1:
        assert time.monotonic() < deadline, "the compaction did not finish in 30 s"
        time.sleep(0.05)


def test_history_older_than_the_count_raises_compacted_with_the_oldest(
    clean_env: dict[str, str], authkey: bytes
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc, address = _start(env, "--watch-history", "10")
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("h")
            for i in range(25):
                d["k"] = i
            with pytest.raises(CompactedError) as info:
                list(d.watch(since=3, timeout=0))
            assert (info.value.oldest, info.value.revision) == (15, 25)
            assert "older than the history" in str(info.value)
            assert [e.value for e in d.watch(since=info.value.oldest, timeout=0)] == list(
                range(15, 25)
            )
    finally:
        _stop(proc)


def test_a_batch_counts_its_keys_against_the_history_bound(
    clean_env: dict[str, str], authkey: bytes
) -> None:
    # 100 set_many batches of 10,000 keys each held 111 B per stored key while the bound
    # counted calls; counted as keys, the history keeps --watch-history changes, and always
    # the newest change however large, so a watcher at the latest revision still sees it.
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc, address = _start(env, "--watch-history", "100")
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("h")
            for batch in range(3):  # 150 changes in 3 calls: the first no longer fits
                d.set_many({f"b{batch}:{i}": i for i in range(50)})
            with pytest.raises(CompactedError) as info:
                list(d.watch(since=0, timeout=0))
            assert (info.value.oldest, info.value.revision) == (1, 3)
            events = list(d.watch(since=1, timeout=0))
            assert [(e.revision, e.key) for e in events[::50]] == [(2, "b1:0"), (3, "b2:0")]
            assert len(events) == 100
            for i in range(30):  # single changes count too, when the next batch comes
                d[f"s{i}"] = i
            assert len(list(d.watch(since=1, timeout=0))) == 130
            d.set_many({"x": 1, "y": 2})  # 30 + 2 + 50 + 50 > 100: batch 2 goes
            with pytest.raises(CompactedError) as info:
                list(d.watch(since=1, timeout=0))
            assert info.value.oldest == 2
            d.set_many({f"big:{i}": i for i in range(300)})  # alone more than the bound
            with pytest.raises(CompactedError) as info:
                list(d.watch(since=d.revision() - 2, timeout=0))
            newest = list(d.watch(since=d.revision() - 1, timeout=0))
            assert [e.key for e in newest] == [f"big:{i}" for i in range(300)]
    finally:
        _stop(proc)


def test_a_history_longer_than_the_default_survives_a_restart_from_a_snapshot(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    args = ["--watch-history", "3000", "--data-dir", str(tmp_path / "data")]
    proc, address = _start(env, *args)
    try:
        with kvclient.connect(address, authkey) as kv:
            with kv.batch() as batch:
                long = batch.dict("long")
                for i in range(2500):  # more than the default history of 1,000
                    long.set("k", i)
            _compacted(kv)  # a snapshot holds it all
    finally:
        _stop(proc)
    proc, address = _start(env, *args)
    try:
        with kvclient.connect(address, authkey) as kv:
            events = list(kv.dict("long").watch(since=0, timeout=0))
            assert [e.value for e in events] == list(range(2500))
    finally:
        _stop(proc)


def test_a_restart_from_a_snapshot_keeps_what_the_running_server_kept(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path
) -> None:
    # Single writes after a batch count when the next batch comes (up to 2x the bound): the
    # load used to evict to the bound at once, so a cursor valid before the restart was not.
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    args = ["--watch-history", "100", "--data-dir", str(tmp_path / "data")]
    proc, address = _start(env, *args)
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("h")
            for batch in range(3):
                d.set_many({f"b{batch}:{i}": i for i in range(50)})
            for i in range(30):
                d[f"s{i}"] = i
            assert len(list(d.watch(since=1, timeout=0))) == 130
            _compacted(kv)
    finally:
        _stop(proc)
    proc, address = _start(env, *args)
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("h")
            assert len(list(d.watch(since=1, timeout=0))) == 130
            with pytest.raises(CompactedError):  # and no more than it kept
                list(d.watch(since=0, timeout=0))
    finally:
        _stop(proc)


@pytest.mark.parametrize(
    "kind,method,kw",
    [
        ("dict", "set_many", "mapping"),
        ("dict", "update", "other"),
        ("namespace", "update", "mapping"),
    ],
)
def test_a_batch_sent_by_keyword_counts_its_keys(
    clean_env: dict[str, str], authkey: bytes, kind: str, method: str, kw: str
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc, address = _start(env, "--watch-history", "100")
    try:
        with kvclient.connect(address, authkey) as kv:
            c = kv.dict("h") if kind == "dict" else kv.namespace("h")
            for batch in range(3):  # 150 changes: batch 0 must go, as a positional one does
                c._call(method, [], {kw: {f"b{batch}_{i}": i for i in range(50)}})
            with pytest.raises(CompactedError) as info:
                list(c.watch(since=0, timeout=0))
            assert info.value.oldest == 1
            assert len(list(c.watch(since=1, timeout=0))) == 100
    finally:
        _stop(proc)


def test_every_batch_method_takes_one_argument() -> None:
    # history._weight counts a batch by its one argument, positional or the one keyword.
    import inspect

    from kvserve import containers
    from kvserve.history import MANY

    found = 0
    for cls in vars(containers).values():
        if not isinstance(cls, type):
            continue
        for name in MANY & set(vars(cls)):
            params = list(inspect.signature(getattr(cls, name)).parameters)[1:]
            assert len(params) == 1, (cls.__name__, name, params)
            found += 1
    assert found >= 6


def test_history_older_than_the_age_is_dropped(clean_env: dict[str, str], authkey: bytes) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc, address = _start(env, "--watch-history-age", "1")
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("aged")
            d["a"] = 1
            assert len(list(d.watch(since=0, timeout=0))) == 1
            time.sleep(1.5)
            d["b"] = 2
            with pytest.raises(CompactedError) as info:
                list(d.watch(since=0, timeout=0))
            assert info.value.oldest == 1
    finally:
        _stop(proc)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_watcher_cannot_grow_server_memory(
    clean_env: dict[str, str], authkey: bytes
) -> None:
    # A watcher that never reads holds nothing: the history is bounded by count, each answer by
    # MAX_WATCH_EVENTS. 60 MiB of overwrites of one key must not make the server hold them.
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc, address = _start(env, "--watch-history", "1000")
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("big")
            value = "x" * 16384
            slow = d.watch(since=0, timeout=0)
            assert slow.revision == 0
            for _ in range(500):
                d["k"] = value
            first = next(slow)  # reads one event, then sits on the rest
            assert first.revision == 1
            before = _rss_kib(proc.pid)
            for _ in range(4000):  # 64 MiB more written
                d["k"] = value
            after = _rss_kib(proc.pid)
            assert after - before < 24 * 1024, (before, after)
            with pytest.raises(CompactedError) as info:
                for _ in slow:  # what it fetched (a bounded answer), then: it fell behind
                    pass
            assert info.value.oldest == 4500 - 1000
    finally:
        _stop(proc)


def test_one_watch_answer_is_bounded(kv: kvclient.Client) -> None:
    d = kv.dict("bounded")
    for i in range(900):
        d[i] = i
    cursor, events = kv.call("dict", "bounded", "watch", [0, 0, None, None, 300])
    assert len(events) == 300 and cursor == 300
    w = d.watch(0, timeout=0, limit=300)
    assert [e.value for e in w] == list(range(900))  # the iterator makes the other calls


@pytest.mark.parametrize("compact", [False, True], ids=["log", "snapshot"])
def test_watch_resumes_across_kill_9_with_fsync_always(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path, compact: bool
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    data = ["--data-dir", str(tmp_path / "data"), "--fsync", "always"]
    proc, address = _start(env, *data)
    port = address.rsplit(":", 1)[1]
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tests.watch_workers import acked_incr_worker as w;"
            f" w({address!r}, {authkey!r}, 100000)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
    )
    seen: list[Event] = []
    try:
        with kvclient.connect(address, authkey) as kv:
            watch = kv.dict("seq").watch(since=0, timeout=30)
            for event in watch:
                seen.append(event)
                if compact and len(seen) == 150:
                    kv.compact()
                if len(seen) == 300:
                    break
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        out, _ = writer.communicate(timeout=60)
        acked = [int(line) for line in out.split()]
        # The watcher saw 300 changes; the writer may not have read the last reply before the
        # kill (its reply and the watcher's left in the same group commit).
        assert acked == list(range(1, len(acked) + 1)) and len(acked) >= 290
        resume = watch.revision
        assert resume == 300
        proc, address = _start(env, *data, "--port", port)
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("seq")
            final = d.revision()
            assert final >= acked[-1]  # nothing acknowledged was lost
            rest = list(d.watch(since=resume, timeout=0))
        events = seen + rest
        assert [e.revision for e in events] == list(range(1, final + 1))
        assert [e.value for e in events] == list(range(1, final + 1))
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate(timeout=30)
        _stop(proc)


def test_a_watcher_follows_a_restart_on_its_own(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path
) -> None:
    # The iterator's calls are reads: the client reconnects and asks again from its revision.
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    data = ["--data-dir", str(tmp_path / "data"), "--fsync", "always"]
    proc, address = _start(env, *data)
    port = address.rsplit(":", 1)[1]
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("follow")
            d["a"] = 1
            watch = d.watch(since=0, timeout=60)
            assert next(watch).key == "a"
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
            proc, _ = _start(env, *data, "--port", port)
            with kvclient.connect(address, authkey) as kv2:
                kv2.dict("follow")["b"] = 2
            assert next(watch) == Event(2, "set", "b", 2)
    finally:
        _stop(proc)
