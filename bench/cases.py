"""The workloads: what each case does, with how many client processes.

A case names an operation, a value and a number of client processes. Each client uses its
own keys (except ``incr``, where every client hits one hot key), so the cases measure the
service, not contention on one entry.

Cases come in groups, each run against its own systems: ``main`` against ``--systems``
(kvserve, the stdlib manager, the raw floor, Redis); ``durability`` (issue 6) against the
in-memory kvserve and kvserve with ``--data-dir`` under each ``--fsync`` policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from bench.systems import DICT_VALUE, DURABLE_SYSTEMS, MIB_VALUE, STR_VALUE

__all__ = ["BATCH", "CASES", "DURABILITY", "DURABILITY_SYSTEMS", "Case", "select_cases"]

BATCH: Final = 100
DURABILITY: Final = "durability"
"""Group name, and the ``--only`` word that selects the group (its cases and the restart)."""
DURABILITY_SYSTEMS: Final = ("kvserve", *DURABLE_SYSTEMS)
"""What the durability cases run against: in-memory kvserve first, the reference of the ratios."""


@dataclass(frozen=True)
class Case:
    """One workload.

    Attributes:
        name: short id used in tables and ``--only`` (``get-str-c4``).
        kind: ``get``, ``set``, ``incr``, ``mget``, ``mset`` or ``queue``.
        value: ``str`` (100 chars), ``dict`` (``{'a': 1, 'b': [1, 2, 3]}``) or ``1mib`` (bytes).
        clients: client processes driving the server at once.
        batch: operations per round trip; ops/s counts operations, not round trips.
        group: ``main`` or ``durability`` (which systems it runs against).
    """

    name: str
    kind: str
    value: str
    clients: int
    batch: int = 1
    group: str = "main"

    @property
    def payload(self) -> Any:
        """The value stored or read."""
        return {"str": STR_VALUE, "dict": DICT_VALUE, "1mib": MIB_VALUE}[self.value]

    def role(self, index: int) -> str:
        """Return what client ``index`` does: the case's kind, or ``put``/``qget`` for queue."""
        if self.kind == "queue":
            return "put" if index == 0 else "qget"
        return self.kind

    def counted(self, index: int) -> bool:
        """Whether client ``index``'s operations count towards ops/s and latency.

        In the queue case only the consumer counts: ops/s is items delivered per second.
        """
        return self.kind != "queue" or index == 1


def _make_cases() -> list[Case]:
    cases: list[Case] = []
    for clients in (1, 4, 16):
        for value in ("str", "dict"):
            for kind in ("get", "set"):
                cases.append(Case(f"{kind}-{value}-c{clients}", kind, value, clients))
    cases.append(Case("incr-hot-c4", "incr", "str", 4))
    cases.append(Case("queue-c2", "queue", "str", 2))
    cases.append(Case(f"mget{BATCH}-str-c1", "mget", "str", 1, BATCH))
    cases.append(Case(f"mset{BATCH}-str-c1", "mset", "str", 1, BATCH))
    cases.append(Case("get-1mib-c1", "get", "1mib", 1))
    # SET, because only mutations reach the log; 4 clients is where group commit shows.
    for clients in (1, 4):
        cases.append(Case(f"durable-set-str-c{clients}", "set", "str", clients, group=DURABILITY))
    return cases


CASES: Final = tuple(_make_cases())


def select_cases(only: list[str] | None) -> list[Case]:
    """Return the cases named by ``only`` (all when None or empty).

    A word equal to a case name selects that case, ``durability`` selects that group; any
    other word selects every case whose name contains it (``c16``, ``get-str``, ``mget``).
    """
    if not only:
        return list(CASES)
    names = {c.name for c in CASES}

    def selected(case: Case, word: str) -> bool:
        if word == DURABILITY:
            return case.group == DURABILITY
        return case.name == word if word in names else word in case.name

    return [c for c in CASES if any(selected(c, word) for word in only)]
