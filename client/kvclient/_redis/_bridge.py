"""Run the Valkey/Redis backend's synchronous per-operation code on an asyncio event loop.

The backend's logic (which script, which keys and arguments, how a reply decodes, request
ids, slot routing, ``MOVED``/``ASK``, the queue's and the primitives' wait loops) is written
once, as plain functions (:mod:`kvclient._redis.kinds`, :mod:`kvclient._redis._backend`,
:mod:`kvclient._redis._nodes`). Its IO goes through a handful of calls (a node client's
``execute_command``, a pipeline's ``execute``, a sleep). :func:`run` runs such a function in
a greenlet; :func:`wait`, called where that code does IO, hands an awaitable (a
``redis.asyncio`` command) to the task that called :func:`run`, which awaits it and resumes
the function with its result, or raises its error there. So the asyncio front end shares every
line of the logic and only its IO differs; a task waiting in ``BLMOVE`` holds its own
connection and nothing else, and the loop runs other tasks meanwhile.

Cancelling the task raises ``CancelledError`` in the function where it waits, so its
``finally`` clauses run, then in the task.

Rejected: a copy of every handler written with ``async def`` (two definitions of each
operation to keep in step), handlers as generators yielding IO (every handler of every kind
rewritten, every line of their callers too), and running the sync backend in threads (a
cancelled task cannot stop its thread, which goes on waiting and taking items).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import greenlet

__all__ = ["Task", "run", "wait"]

_T = TypeVar("_T")


class Task(greenlet.greenlet):  # type: ignore[misc]
    """The greenlet of one call, and what the backend keeps for it while it runs.

    Attributes:
        state: the call's state the backend keeps (its request-id session).
        blocked: ``(node, client id)`` of the connection of the last blocking command it
            sent (``BLMOVE``/``BLPOP``), for a fence to unblock; None if none.
    """

    def __init__(self, run: Callable[..., Any], state: Any) -> None:
        super().__init__(run)
        self.state = state
        self.blocked: tuple[Any, int] | None = None


def current() -> Task:
    """Return the call running now.

    Raises:
        RuntimeError: not inside :func:`run` (a sync call made on the asyncio backend).
    """
    here = greenlet.getcurrent()
    if not isinstance(here, Task):
        raise RuntimeError("the asyncio Valkey/Redis backend's IO runs only inside its calls")
    return here


def wait(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` from the synchronous code of a call; return its result or raise."""
    task = current()
    result: _T = task.parent.switch(awaitable)
    return result


async def run(task: Task, *args: Any) -> Any:
    """Run ``task``'s function with ``args``, awaiting the IO it hands to :func:`wait`."""
    step = task.switch(*args)
    while not task.dead:
        try:
            value = await step
        except BaseException as exc:  # raised where the call waits: it may clean up
            step = task.throw(exc)
        else:
            step = task.switch(value)
    return step
