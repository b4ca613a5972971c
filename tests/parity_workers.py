"""Client-process bodies for the stdlib-parity tests: importable cheaply (no pytest) by children."""

from __future__ import annotations

from tests.targets import Target


def task_worker(target: Target, name: str) -> None:
    """Take items from queue ``name`` until None; count each, then call ``task_done``.

    The count goes to dict ``"<name>-done"`` before ``task_done``, so a ``join()`` that
    returns early is seen as a count short of the items put.
    """
    with target.connect() as kv:
        jobs, done = kv.queue(name), kv.dict(f"{name}-done")
        while (item := jobs.get(timeout=30)) is not None:
            done.incr("count")
            done.incr("sum", item)
            jobs.task_done()
        jobs.task_done()  # the None too
