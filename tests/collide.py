"""Keys that all share one CPython 3.11 hash, for the hostile tests (from the attack report).

CPython hashes an int to itself modulo 2**61 - 1 (no randomization) and a tuple with a fixed,
invertible xxHash-like round over its items' hashes, so for any first item one can solve for
the second item that gives a chosen tuple hash.
"""

from __future__ import annotations

_MASK = (1 << 64) - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
_MODULUS = (1 << 61) - 1
_INV1, _INV2 = pow(_P1, -1, 1 << 64), pow(_P2, -1, 1 << 64)


def _rotl(x: int) -> int:
    return ((x << 31) | (x >> 33)) & _MASK


def _rotr(x: int) -> int:
    return ((x >> 31) | (x << 33)) & _MASK


def colliding_pairs(count: int, target: int = 0x123456789) -> list[tuple[int, int]]:
    """Return ``count`` distinct 2-tuples of 64-bit ints whose ``hash()`` is all the same."""
    final = (target - (2 ^ (_P5 ^ 3527539))) & _MASK
    wanted = _rotr((final * _INV1) & _MASK)
    out: list[tuple[int, int]] = []
    first = 1
    while len(out) < count:
        acc = (_rotl((_P5 + first * _P2) & _MASK) * _P1) & _MASK
        lane = ((wanted - acc) * _INV2) & _MASK
        if 0 < lane < _MODULUS - 1:
            out.append((first, lane))
        elif lane >= (1 << 64) - (_MODULUS - 2) and lane - (1 << 64) != -1:
            out.append((first, lane - (1 << 64)))
        first += 1
    return out
