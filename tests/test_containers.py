"""Every container operation against a live server, compared with the local type."""

from __future__ import annotations

import collections.abc
import multiprocessing
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvclient import KindError, NoSuchContainerError
from kvserve import KVManager, KVQueue, Server
from kvserve.persistence import Persistence
from tests import parity_workers
from tests.targets import Target


def test_dict_mapping_interface(kv: kvclient.Client) -> None:
    d = kv.dict("users")
    d["a"] = 1
    d["b"] = [1, (2, 3)]
    d[("t", 1)] = b"bytes"
    assert d["a"] == 1
    assert d["b"] == [1, (2, 3)]
    assert d[("t", 1)] == b"bytes"
    assert "a" in d
    assert "zz" not in d
    assert len(d) == 3
    assert list(d) == ["a", "b", ("t", 1)]
    assert d.keys() == ["a", "b", ("t", 1)]
    assert d.values() == [1, [1, (2, 3)], b"bytes"]
    assert d.items() == [("a", 1), ("b", [1, (2, 3)]), (("t", 1), b"bytes")]
    assert d.get("a") == 1
    assert d.get("zz") is None
    assert d.get("zz", 5) == 5
    assert d.copy() == {"a": 1, "b": [1, (2, 3)], ("t", 1): b"bytes"}
    del d[("t", 1)]
    with pytest.raises(KeyError) as excinfo:
        d["missing"]
    assert excinfo.value.args == ("missing",)
    with pytest.raises(KeyError):
        del d["missing"]
    d.update({"c": 3}, d=4)
    d.update([("e", 5)])
    assert d.copy() == {"a": 1, "b": [1, (2, 3)], "c": 3, "d": 4, "e": 5}
    assert d.pop("e") == 5
    assert d.pop("e", "dflt") == "dflt"
    with pytest.raises(KeyError):
        d.pop("e")
    assert d.popitem() == ("d", 4)
    assert d.setdefault("c", 99) == 3
    assert d.setdefault("n", 99) == 99
    assert d["n"] == 99
    d.clear()
    assert len(d) == 0
    with pytest.raises(KeyError):
        d.popitem()


def test_dict_atomic_operations(kv: kvclient.Client) -> None:
    d = kv.dict("counters")
    assert d.incr("hits") == 1
    assert d.incr("hits", 5) == 6
    assert d.incr("hits", -2) == 4
    assert d.incr("new", default=10) == 11
    assert d.incr("f", 0.5) == 0.5
    assert d.incr("big", 2**70) == 2**70
    d["s"] = "text"
    with pytest.raises(TypeError, match="not a number"):
        d.incr("s")
    with pytest.raises(TypeError, match="not a number"):
        d.incr("hits", "1")  # type: ignore[arg-type]
    assert d["s"] == "text"  # a failed incr changes nothing

    assert d.cas("hits", 4, 40) is True
    assert d["hits"] == 40
    assert d.cas("hits", 4, 400) is False
    assert d.cas("hits", 40.0, 400) is False  # strict about type
    assert d.cas("absent", None, 1) is False
    assert "absent" not in d
    assert d["hits"] == 40

    d.set_many({"k1": 1, "k2": 2, ("t",): 3})
    assert d.get_many(["k1", "k2", ("t",), "missing"]) == {"k1": 1, "k2": 2, ("t",): 3}
    assert d.delete_many(["k1", "k2", "missing"]) == 2
    assert "k1" not in d


def test_list_interface(kv: kvclient.Client) -> None:
    lst = kv.list("jobs")
    local: list[Any] = []
    for target in (lst, local):
        target.append(1)
        target.extend([2, 3, 4])
        target.insert(0, 0)
    lst += [5]
    local += [5]
    assert lst.copy() == local == [0, 1, 2, 3, 4, 5]
    assert len(lst) == 6
    assert lst[0] == 0
    assert lst[-1] == 5
    assert lst[1:4] == [1, 2, 3]
    assert lst[::2] == [0, 2, 4]
    assert lst[::-1] == [5, 4, 3, 2, 1, 0]
    lst[0] = "zero"
    lst[1:3] = ["a", "b", "c"]
    local[0] = "zero"
    local[1:3] = ["a", "b", "c"]
    assert lst.copy() == local
    del lst[0]
    del lst[::2]
    del local[0]
    del local[::2]
    assert lst.copy() == local
    assert list(lst) == local
    assert ("b" in lst) == ("b" in local)
    with pytest.raises(IndexError):
        lst[100]
    with pytest.raises(TypeError, match="integers or slices"):
        lst["x"]  # type: ignore[index]
    lst.clear()
    lst.extend([3, 1, 2, 1])
    assert lst.index(1) == 1
    assert lst.index(1, 2) == 3
    with pytest.raises(ValueError):
        lst.index(99)
    assert lst.count(1) == 2
    lst.remove(1)
    with pytest.raises(ValueError):
        lst.remove(99)
    lst.sort()
    assert lst.copy() == [1, 2, 3]
    lst.sort(reverse=True)
    assert lst.copy() == [3, 2, 1]
    lst.reverse()
    assert lst.copy() == [1, 2, 3]
    with pytest.raises(TypeError, match="key"):
        lst.sort(key=len)  # type: ignore[arg-type]
    assert lst.pop() == 3
    assert lst.pop(0) == 1
    lst.clear()
    with pytest.raises(IndexError):
        lst.pop()


def test_namespace(kv: kvclient.Client) -> None:
    ns = kv.namespace("config")
    ns.workers = 4
    ns.name = "prod"
    assert ns.workers == 4
    assert ns.incr("workers") == 5
    assert ns.incr("fresh", 2) == 2
    assert ns.to_dict() == {"workers": 5, "name": "prod", "fresh": 2}
    del ns.name
    with pytest.raises(AttributeError, match="name"):
        ns.name
    with pytest.raises(AttributeError):
        del ns.name
    assert ns.to_dict() == {"workers": 5, "fresh": 2}
    with pytest.raises(AttributeError):
        ns._private  # underscored names are never sent to the server


def test_namespace_underscore_attributes_stay_local_and_str_is_the_stdlibs(
    kv: kvclient.Client,
) -> None:
    ns = kv.namespace("bob", initial={"name": "Bob", "job": "Builder"})
    ns._hidden = "hidden"  # kept by this proxy object only, as with the stdlib NamespaceProxy
    assert ns._hidden == "hidden"
    assert kv.namespace("bob").to_dict() == {"name": "Bob", "job": "Builder"}
    with pytest.raises(AttributeError):
        kv.namespace("bob")._hidden  # another proxy object does not see it
    del ns.job
    assert str(ns) == "Namespace(name='Bob')"
    assert repr(ns) == f"<NamespaceProxy object, typeid 'Namespace' at {kv.endpoint}, name 'bob'>"
    assert hasattr(ns, "name") and not hasattr(ns, "job")
    del ns._hidden
    assert not hasattr(ns, "_hidden")


def test_initial_contents_are_applied_only_when_created(kv: kvclient.Client) -> None:
    assert kv.list("l", initial=range(3)).copy() == [0, 1, 2]
    assert kv.list("l", initial=["ignored"]).copy() == [0, 1, 2]  # it exists: unchanged
    assert kv.dict("d", initial=[("a", 1)]).copy() == {"a": 1}
    assert kv.dict("d", initial={"b": 2}).copy() == {"a": 1}
    assert kv.namespace("n", initial={"x": 1}).to_dict() == {"x": 1}
    assert kv.namespace("n", initial={"y": 2}).to_dict() == {"x": 1}
    inner = kv.list("inner", initial=[1])
    outer = kv.list("outer", initial=[inner, [2]])
    outer[0].append(9)  # proxies given as contents stay references
    assert inner.copy() == [1, 9]
    with pytest.raises(TypeError, match="attribute name must be str"):
        kv.call(None, None, "create", ["namespace", "bad", {1: 2}])
    with pytest.raises(TypeError, match="must be a map"):
        kv.call(None, None, "create", ["dict", "bad", [1, 2]])
    assert "bad" not in kv.names()


def test_proxies_pass_the_collections_abc_checks(kv: kvclient.Client) -> None:
    assert isinstance(kv.dict("d"), collections.abc.MutableMapping)
    assert isinstance(kv.list("l"), collections.abc.MutableSequence)
    assert str(kv.dict("d2", initial={"a": 1})) == "{'a': 1}"
    assert str(kv.list("l2", initial=[1])) == "[1]"


def test_list_operators_follow_the_stdlib_listproxy(kv: kvclient.Client) -> None:
    b = kv.list("b", initial=range(3))
    assert b + [5] == [0, 1, 2, 5]  # noqa: RUF005 - a local list, as the stdlib's ListProxy
    assert b * 2 == [0, 1, 2, 0, 1, 2]
    assert 2 * b == [0, 1, 2, 0, 1, 2]
    assert list(reversed(b)) == [2, 1, 0]
    same = b
    before = kv.stats()["ops"]
    b *= 2
    assert kv.stats()["ops"] - before == 2  # the `*=` and this stats call: one call each
    assert b is same  # in place: the name still holds the proxy
    assert kv.list("b").copy() == [0, 1, 2, 0, 1, 2]
    b += (7,)
    assert b is same and b.copy() == [0, 1, 2, 0, 1, 2, 7]
    b *= 0
    assert b.copy() == []
    with pytest.raises(TypeError):
        b * "x"  # type: ignore[operator]
    with pytest.raises(TypeError):
        b + (1,)  # type: ignore[operator]  # noqa: RUF005
    big = kv.list("big", initial=range(1000))
    with pytest.raises(ValueError, match="would hold more than"):
        big *= 1 << 20
    assert len(big) == 1000  # refused, not applied


def test_queue_interface(kv: kvclient.Client) -> None:
    q = kv.queue("work", maxsize=2)
    assert q.maxsize == 2
    assert q.empty() is True
    q.put({"id": 1})
    q.put_nowait((2, "two"))
    assert q.full() is True
    assert q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    assert q.get() == {"id": 1}
    assert q.get_nowait() == (2, "two")
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)


def test_queue_task_done_and_join_across_processes(kv: kvclient.Client, kv_target: Target) -> None:
    ctx = multiprocessing.get_context("forkserver")
    workers = [
        ctx.Process(target=parity_workers.task_worker, args=(kv_target, "jobs")) for _ in range(4)
    ]
    for p in workers:
        p.start()
    try:
        jobs = kv.queue("jobs")
        for i in range(1, 201):
            jobs.put(i)
        jobs.join()  # parked on the server until the 200th task_done
        done = kv.dict("jobs-done")
        # Every task_done follows its item's count, so an early return would show here.
        assert done.copy() == {"count": 200, "sum": 200 * 201 // 2}
        assert jobs.unfinished_tasks() == 0
        for _ in workers:
            jobs.put(None)
        jobs.join()
        for p in workers:
            p.join(20)
            assert p.exitcode == 0
        with pytest.raises(ValueError, match="task_done\\(\\) called too many times"):
            jobs.task_done()
    finally:
        for p in workers:
            p.kill()
            p.join(10)


def test_a_parked_join_does_not_hold_up_the_gets_parked_after_it(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    q = kv.queue("line")
    q.put("first")
    assert q.get() == "first"  # unfinished 1, queue empty
    joined = threading.Event()

    def join() -> None:
        q.join()
        joined.set()

    joiner = threading.Thread(target=join)
    joiner.start()
    time.sleep(0.2)  # the join parks first
    got: list[Any] = []
    getter = threading.Thread(target=lambda: got.append(kv2.queue("line").get(timeout=10)))
    getter.start()
    time.sleep(0.2)  # then a get, behind it
    q.put("second")  # the join still waits (2 unfinished); the get must not
    getter.join(10)
    assert got == ["second"]
    assert not joined.is_set()
    q.task_done()
    q.task_done()
    joiner.join(10)
    assert joined.is_set()
    with kv.batch() as b:
        b.bind(q).put("third")
        b.bind(q).join()  # a batch never waits: the unfinished task is an error
    assert b.results is not None
    assert b.results[0] is None
    assert isinstance(b.results[1], ValueError)
    assert "1 task(s) unfinished; join() cannot wait in a batch" in str(b.results[1])


def test_queue_put_in_a_batch(kv: kvclient.Client) -> None:
    """Issue 12: ``queue.put`` in a batch raised TypeError in the client."""
    kv.queue("bounded", maxsize=1)
    with kv.batch() as b:
        q = b.queue("bq")
        q.put(1)
        q.put(2)
        full = b.queue("bounded")
        full.put("a")
        full.put("b")  # a batch never waits: Full
    assert b.results is not None
    assert b.results[:3] == [None, None, None]
    assert isinstance(b.results[3], queue.Full)
    assert [kv.queue("bq").get_nowait() for _ in range(2)] == [1, 2]
    assert kv.queue("bounded").qsize() == 1


def test_queue_get_timeout_raises_empty_on_time(kv: kvclient.Client) -> None:
    q = kv.queue("empty")
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 5.0, elapsed


def test_queue_put_timeout_raises_full(kv: kvclient.Client) -> None:
    q = kv.queue("tight", maxsize=1)
    q.put(1)
    start = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(2, timeout=0.1)
    assert time.monotonic() - start >= 0.09
    assert q.qsize() == 1


def test_queue_maxsize_is_fixed_at_creation(kv: kvclient.Client) -> None:
    kv.queue("fixed", maxsize=3)
    assert kv.queue("fixed").maxsize == 3  # no maxsize given: accept the existing queue
    with pytest.raises(ValueError, match="maxsize 3"):
        kv.queue("fixed", maxsize=5)


def test_get_or_create_by_name(kv: kvclient.Client, kv2: kvclient.Client) -> None:
    kv.dict("shared")["x"] = 1
    assert kv2.dict("shared")["x"] == 1
    assert kv2.dict("shared") == kv.dict("shared")


def test_name_taken_by_another_kind_is_a_clear_error(kv: kvclient.Client) -> None:
    kv.dict("users")["a"] = 1
    with pytest.raises(KindError, match="'users' already exists as a dict, not a list"):
        kv.list("users")
    assert isinstance(KindError("x"), TypeError)
    assert kv.dict("users")["a"] == 1


def test_names_and_drop(kv: kvclient.Client) -> None:
    assert kv.names() == {}
    kv.dict("d")["k"] = 1
    kv.list("l").append(1)
    kv.namespace("n")
    kv.queue("q")
    assert kv.names() == {"d": "dict", "l": "list", "n": "namespace", "q": "queue"}
    assert kv.describe()["d"] == {"kind": "dict", "size": 1}
    stale = kv.dict("d")
    assert kv.drop("d") is True
    assert kv.drop("d") is False
    assert "d" not in kv.names()
    with pytest.raises(NoSuchContainerError, match="'d'"):
        stale["k"]
    assert kv.dict("d").copy() == {}  # a new, empty dict under the old name


def test_invalid_container_names(kv: kvclient.Client) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        kv.dict("")
    with pytest.raises(ValueError, match="non-empty"):
        kv.dict("x" * 5000)


def test_nested_container_reference_round_trip(kv: kvclient.Client) -> None:
    registry = kv.dict("registry")
    jobs = kv.list("jobs")
    registry["jobs"] = jobs
    registry["nested"] = {"queue": kv.queue("q"), "list": [jobs]}
    got = registry["jobs"]
    assert isinstance(got, kvclient.ListProxy)
    assert got == jobs
    got.append("task")  # the reference is a working proxy
    assert jobs.copy() == ["task"]
    nested = registry["nested"]
    assert isinstance(nested["queue"], kvclient.QueueProxy)
    nested["queue"].put(1)
    assert kv.queue("q").get_nowait() == 1
    assert nested["list"][0].copy() == ["task"]


def test_unsupported_value_type_is_a_type_error_and_nothing_is_stored(kv: kvclient.Client) -> None:
    d = kv.dict("d")
    d["keep"] = 1
    with pytest.raises(TypeError, match="'set'"):
        d["bad"] = {1, 2}
    with pytest.raises(TypeError, match="'object'"):
        d.update({"ok": 1, "bad": object()})
    with pytest.raises(TypeError, match="'set'"):
        kv.list("l").append({1})
    assert d.copy() == {"keep": 1}
    assert len(kv.list("l")) == 0
    assert d["keep"] == 1  # the connection still works after a refused encode


def test_unknown_method_is_attribute_error(kv: kvclient.Client) -> None:
    d = kv.dict("d")
    with pytest.raises(AttributeError, match="has no method '__class__'"):
        kv.call("dict", d.name, "__class__", [])
    with pytest.raises(AttributeError, match="has no method 'data'"):
        kv.call("dict", d.name, "data", [])


def test_errors_from_the_server_carry_no_traceback(kv: kvclient.Client) -> None:
    with pytest.raises(KeyError) as excinfo:
        kv.dict("d")["missing"]
    assert excinfo.value.__traceback__ is not None
    assert "Traceback" not in str(excinfo.value)


def test_batch_sends_calls_on_several_containers_in_one_frame(kv: kvclient.Client) -> None:
    kv.dict("users")["alice"] = 1
    before = kv.stats()
    with kv.batch() as b:
        users = b.dict("users")
        log = b.bind(kv.list("log"))
        first = users.get("alice")
        users["bob"] = 2
        hits = users.incr("hits")
        missing = users["nobody"]
        log.append("added bob")
        popped = b.queue("q").get(timeout=5)
        assert not first.done
    after = kv.stats()
    # Frames: 3 creates (b.dict, kv.list, b.queue) + 1 batch + 1 stats; the 6 calls in one.
    assert after["requests"] - before["requests"] == 3 + 1 + 1
    assert after["ops"] - before["ops"] == 3 + 6 + 1
    assert first.value == 1
    assert hits.value == 1
    with pytest.raises(KeyError):
        missing.value
    with pytest.raises(queue.Empty):  # a batch never waits
        popped.value
    assert b.results is not None
    assert b.results[:3] == [1, None, 1]
    assert isinstance(b.results[3], KeyError)
    assert kv.dict("users").copy() == {"alice": 1, "bob": 2, "hits": 1}
    assert kv.list("log").copy() == ["added bob"]


def test_batch_misuse_is_explained(kv: kvclient.Client) -> None:
    b = kv.batch()
    d = b.dict("d")
    pending = d.get("x")
    with pytest.raises(RuntimeError, match="not been sent"):
        pending.value
    with pytest.raises(TypeError, match="no value until the batch is sent"):
        bool("x" in d)
    b.send()
    assert pending.value is None
    with pytest.raises(RuntimeError, match="already sent"):
        d.get("x")


def test_batch_is_not_sent_when_the_block_raises(kv: kvclient.Client) -> None:
    with pytest.raises(ZeroDivisionError), kv.batch() as b:
        b.dict("d")["x"] = 1
        1 / 0
    assert kv.dict("d").copy() == {}
    assert b.results is None


def test_unfinished_tasks_and_list_repeats_survive_a_restart(
    tmp_path: Path, authkey: bytes
) -> None:
    def serve() -> tuple[Server, threading.Thread]:
        srv = KVManager(
            ("127.0.0.1", 0), authkey=authkey, persistence=Persistence(tmp_path / "d", "no")
        ).get_server()
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        return srv, thread

    for compact in (False, True):  # replayed from the log, then loaded from a snapshot
        srv, thread = serve()
        try:
            with kvclient.connect(srv.endpoint, authkey, retry=None) as kv:
                q, items = kv.queue(f"q{compact}"), kv.list(f"l{compact}", initial=[1, 2])
                for i in range(3):
                    q.put(i)
                q.get()
                q.task_done()
                items *= 3
                if compact:
                    assert kv.compact()
        finally:
            srv.stop()
            assert srv.wait_stopped(10)
            thread.join(10)
        srv, thread = serve()
        try:
            with kvclient.connect(srv.endpoint, authkey, retry=None) as kv:
                q = kv.queue(f"q{compact}")
                assert (q.qsize(), q.unfinished_tasks()) == (2, 2)
                assert kv.list(f"l{compact}").copy() == [1, 2] * 3
        finally:
            srv.stop()
            assert srv.wait_stopped(10)
            thread.join(10)


def test_a_queue_state_from_before_task_counts_still_loads() -> None:
    old = KVQueue.from_state([0, [1, 2]])
    assert (old.qsize(), old.unfinished()) == (2, 2)
    assert old.state() == [0, [1, 2], 2]
