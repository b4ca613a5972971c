"""The workloads: what each case does, with how many client processes.

A case names an operation, a value and a number of client processes. Each client uses its
own keys (except ``incr``, where every client hits one hot key), so the cases measure the
service, not contention on one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from bench.systems import DICT_VALUE, MIB_VALUE, STR_VALUE

__all__ = ["BATCH", "CASES", "Case", "select_cases"]

BATCH: Final = 100


@dataclass(frozen=True)
class Case:
    """One workload.

    Attributes:
        name: short id used in tables and ``--only`` (``get-str-c4``).
        kind: ``get``, ``set``, ``incr``, ``mget``, ``mset`` or ``queue``.
        value: ``str`` (100 chars), ``dict`` (``{'a': 1, 'b': [1, 2, 3]}``) or ``1mib`` (bytes).
        clients: client processes driving the server at once.
        batch: operations per round trip; ops/s counts operations, not round trips.
    """

    name: str
    kind: str
    value: str
    clients: int
    batch: int = 1

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
    return cases


CASES: Final = tuple(_make_cases())


def select_cases(only: list[str] | None) -> list[Case]:
    """Return the cases named by ``only`` (all when None or empty).

    A word equal to a case name selects that case; any other word selects every case whose
    name contains it (``c16``, ``get-str``, ``mget``).
    """
    if not only:
        return list(CASES)
    names = {c.name for c in CASES}
    return [
        c
        for c in CASES
        if any(c.name == word if word in names else word in c.name for word in only)
    ]
