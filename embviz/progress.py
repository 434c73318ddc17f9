"""One progress type for every long-running step: fits, perplexity runs, neighbour searches, maps, sweeps.

A worker reports :class:`Progress` (``done`` of ``total`` units, a message, optional detail such as a fit's
loss terms) to a :data:`ProgressCallback`. Returning ``False`` from the callback asks the worker to stop
where it supports cancellation (an AutoEncoder fit stops at the end of the epoch and raises
:class:`embviz.compressors.TrainingCancelled`); any other return value is ignored.

A task made of sub-tasks hands each one a callback from :func:`nested`, which maps the sub-task's own
``done / total`` into the parent's range, so the renderer (a tqdm bar in the CLI, ``st.progress`` in the
app) only ever sees the outer task's progress. This module is the bottom layer: it imports nothing from
embviz.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

LOSS = "loss"
"""The key of a fit's total loss in :attr:`Progress.metrics` (the loss terms follow it)."""


@dataclass(frozen=True)
class Progress:
    """One progress report: ``done`` of ``total`` units finished (fractional while a unit runs).

    Attributes:
        done: units finished, ``0 <= done <= total``.
        total: units in all (steps, batches, epochs x steps, ...).
        message: what is happening, in words (``"epoch 2/6 · step 40/114"``, ``"perplexity (original)"``).
        metrics: figures worth showing live, e.g. a fit's ``loss`` (key :data:`LOSS`) and its loss terms
            (``cosine``, ``abs_power``), each the running mean over the epoch so far.
        epoch: the current epoch of an iterative fit (1-based), or None.
        epochs: the epochs the fit will run, or None.
        epoch_end: this report closes ``epoch`` (its metrics are the epoch's means); a fit can only be
            cancelled at an epoch end.
        elapsed_s: seconds since the reporting task started, or None.
    """

    done: float
    total: float
    message: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    epoch: int | None = None
    epochs: int | None = None
    epoch_end: bool = False
    elapsed_s: float | None = None

    @property
    def fraction(self) -> float:
        """``done / total`` clamped to ``0 .. 1`` (1 for an empty task)."""
        if self.total <= 0:
            return 1.0
        return min(max(self.done / self.total, 0.0), 1.0)

    @property
    def finished(self) -> bool:
        """Whether every unit is done."""
        return self.done >= self.total

    @property
    def loss(self) -> float | None:
        """The fit's total loss, when reported."""
        return self.metrics.get(LOSS)

    @property
    def terms(self) -> dict[str, float]:
        """The loss terms: :attr:`metrics` without the total loss."""
        return {name: value for name, value in self.metrics.items() if name != LOSS}


def format_metrics(update: Progress) -> str:
    """The metrics in words: ``"loss 0.1234 · cosine 0.0567"`` (empty when there are none)."""
    return " · ".join(f"{name} {value:.4g}" for name, value in update.metrics.items())


def describe(update: Progress) -> str:
    """The message followed by the metrics: ``"epoch 2/6 · step 40/114 · loss 0.1234 · cosine 0.0567"``."""
    return " · ".join(part for part in (update.message, format_metrics(update)) if part)


ProgressCallback = Callable[[Progress], bool | None]
"""Receives progress; returning ``False`` cancels the work where cancellation is supported."""


def quiet(update: Progress) -> None:
    """A callback that ignores every report (the default where no one is listening)."""


def send(callback: ProgressCallback | None, update: Progress) -> bool:
    """Deliver ``update`` to ``callback`` (if any); False when the callback asked to cancel, else True."""
    return callback is None or callback(update) is not False


def nested(
    parent: ProgressCallback | None, start: float, end: float, total: float, prefix: str = ""
) -> ProgressCallback:
    """A callback for a sub-task that fills ``start .. end`` of the parent's ``total`` units.

    Each sub-task report reaches ``parent`` with ``done = start + (end - start) * fraction``, the parent's
    ``total``, and its message after ``prefix``; metrics and epoch details pass through, and so does the
    parent's answer (a parent that cancels cancels the sub-task).
    """

    def report(update: Progress) -> bool | None:
        if parent is None:
            return None
        done = start + (end - start) * update.fraction
        return parent(replace(update, done=done, total=total, message=f"{prefix}{update.message}"))

    return report


THROTTLE_S = 0.25
"""The shortest time between two reports a screen shows (:func:`throttled`): four a second look live."""


def throttled(
    callback: ProgressCallback, interval_s: float = THROTTLE_S, clock: Callable[[], float] = time.monotonic
) -> ProgressCallback:
    """``callback`` hearing at most one report per ``interval_s`` seconds, and every report that finishes the
    task or closes an epoch; a report passed over answers what ``callback`` answered last.

    A fast AE fit reports 300 times in 5 s; drawn in a browser each costs the server a message and the
    browser a redraw, on the cores the fit runs on.
    """
    last_shown = -math.inf
    answer: bool | None = None

    def report(update: Progress) -> bool | None:
        nonlocal last_shown, answer
        now = clock()
        if update.finished or update.epoch_end or now - last_shown >= interval_s:
            last_shown = now
            answer = callback(update)
        return answer

    return report


__all__ = [
    "LOSS",
    "THROTTLE_S",
    "Progress",
    "ProgressCallback",
    "describe",
    "format_metrics",
    "nested",
    "quiet",
    "send",
    "throttled",
]
