"""The Pareto frontier of a size-quality table: which results are the best at their size (issue 7)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def frontier(
    rows: Sequence[Mapping[str, Any]], x: str = "bytes", y: str = "perplexity", *, maximize: bool = False
) -> list[bool]:
    """Which rows are Pareto-optimal in (smaller ``x``, lower ``y``; higher ``y`` with ``maximize``).

    A row is on the frontier when no other row is at most as large in ``x`` and at least as good in ``y``
    and strictly better in one of them. Rows missing either value are never on it.
    """
    sign = -1.0 if maximize else 1.0
    points = [
        None if row.get(x) is None or row.get(y) is None else (float(row[x]), sign * float(row[y]))
        for row in rows
    ]

    def dominated(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return b[0] <= a[0] and b[1] <= a[1] and (b[0] < a[0] or b[1] < a[1])

    return [
        point is not None and not any(other is not None and dominated(point, other) for other in points)
        for point in points
    ]
