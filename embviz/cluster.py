"""Sweeps on Ray: each (method, size) job of a sweep as one Ray task, on a local cluster or a remote one.

Every task rebuilds the same :class:`~embviz.evaluation.SweepRunner` (plan and protocol) from plain settings
and returns one row as a dict; nothing but those dicts and the settings crosses between processes. Tasks
share the artifact, neighbour and perplexity caches through ``EMBVIZ_HOME`` (on a cluster: shared storage
mounted at the same path), whose atomic writes and locks make concurrent tasks build each entry once. Rows
come back in plan order, so a Ray sweep's result equals the serial :func:`~embviz.evaluation.sweep`'s; a
failed task is reported with its variant while the other rows are kept.

Ray is an optional extra (``pip install embviz[ray]``); without it :func:`ray_sweep` says how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from embviz.cache import HOME_ENV, embviz_home
from embviz.errors import BadInputError, EmbvizError
from embviz.evaluation import SweepResult, SweepRow, SweepRunner
from embviz.progress import Progress, ProgressCallback, quiet
from embviz.sources import load_model
from embviz.threads import (
    ALL,
    OTHER_RUNTIMES,
    THREADS_ENV,
    configure_threads,
    usable_cores,
    worker_threads,
)

UNCOMPRESSED_TASK = -1
"""The task index of the uncompressed model's row (the jobs are 0 .. n-1)."""


@dataclass(frozen=True)
class TaskFailure:
    """A sweep job whose task failed: which variant, and why."""

    index: int
    variant: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "variant": self.variant, "error": self.error}


@dataclass
class RaySweepResult:
    """The rows that finished (uncompressed first, then plan order; the frontier over those), the tasks
    that failed, and where it ran."""

    rows: SweepResult
    failures: list[TaskFailure] = field(default_factory=list)
    cluster: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=4)
def _runner(model: str, settings_items: tuple[tuple[str, Any], ...]) -> SweepRunner:
    """One runner per worker process and sweep: the backbone loads once, the plan is rebuilt identically."""
    return SweepRunner(load_model(model), **dict(settings_items))


def run_task(model: str, settings: Mapping[str, Any], index: int) -> dict[str, Any]:
    """One task: the uncompressed row (``index`` :data:`UNCOMPRESSED_TASK`) or job ``index``'s row, as the
    dict of :meth:`SweepRow.to_dict`. Runs in a Ray worker, or anywhere (the tests call it directly)."""
    configure_threads(ALL)  # EMBVIZ_THREADS from the driver on a local cluster; else the worker's cores
    runner = _runner(model, _frozen(settings))
    row = runner.uncompressed_row() if index == UNCOMPRESSED_TASK else runner.job_row(index)
    return row.to_dict()


def _frozen(settings: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``settings`` as a hashable key (sequences become tuples)."""
    return tuple(
        (key, tuple(value) if isinstance(value, list) else value) for key, value in sorted(settings.items())
    )


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInputError("sweeps on Ray need the optional extra: pip install 'embviz[ray]'") from None
    return ray


def ray_sweep(
    model: str,
    methods: list[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    task: Callable[[str, Mapping[str, Any], int], dict[str, Any]] = run_task,
    **settings: Any,
) -> RaySweepResult:
    """:func:`~embviz.evaluation.sweep` with every job as a Ray task (``settings``: its keyword arguments but
    ``progress``). ``address`` None starts a local cluster of ``workers`` single-task slots (default: every
    usable core, one torch thread each); otherwise it joins that cluster (``auto``, ``ray://host:port``).
    ``progress`` counts finished tasks; ``task`` is what each task runs (:func:`run_task`).

    The plan is validated here, before the cluster starts: a bad method, size or text is one
    :class:`~embviz.errors.BadInputError`, as in the serial sweep.
    """
    if workers is not None and workers < 1:
        raise BadInputError(f"--workers must be at least 1, got {workers}")
    report = progress or quiet
    settings = {"methods": list(methods), **settings}
    runner = _runner(model, _frozen(settings))  # validates the plan and protocol before any task runs
    ray = _import_ray()
    local = address is None
    slots = workers or usable_cores()
    env = {HOME_ENV: str(embviz_home())}
    if local:
        threads = os.environ.get(THREADS_ENV) or str(worker_threads(slots))
        # Every runtime in a task gets the same count, whatever the driver's own environment says.
        env.update({THREADS_ENV: threads, **dict.fromkeys(OTHER_RUNTIMES, threads)})
    ray.init(
        address=address,
        num_cpus=slots if local else None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": env},
    )
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(task)
        indices = [UNCOMPRESSED_TASK, *range(len(runner.jobs))]
        pending = {remote.remote(model, settings, index): index for index in indices}
        rows: dict[int, SweepRow] = {}
        failures: list[TaskFailure] = []
        total = len(pending)
        report(
            Progress(
                0, total, f"{total} tasks on Ray ({'local, ' + str(slots) + ' slots' if local else address})"
            )
        )
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready)
            name = "uncompressed" if index == UNCOMPRESSED_TASK else runner.tag(index)
            try:
                rows[index] = SweepRow(**ray.get(ready))
                state = "done"
            except Exception as error:  # one task's failure: keep the others, say which variant failed
                cause = getattr(error, "cause", None) or error
                failures.append(TaskFailure(index, name, f"{type(cause).__name__}: {cause}"))
                state = "FAILED"
            report(Progress(total - len(pending), total, f"{name}: {state}"))
        cluster = {
            "address": address or "local",
            "slots": slots if local else int(ray.cluster_resources().get("CPU", 0)),
            "threads_per_task": int(env.get(THREADS_ENV, 0)) or None,
            "ray": ray.__version__,
        }
    finally:
        ray.shutdown()
    ordered = [rows[index] for index in indices if index in rows]
    failures.sort(key=lambda failure: failure.index)
    if UNCOMPRESSED_TASK not in rows:
        raise EmbvizError(
            "the uncompressed model's task failed, so no row can be compared: "
            + "; ".join(f.error for f in failures if f.index == UNCOMPRESSED_TASK)
        )
    return RaySweepResult(runner.result(ordered), failures, cluster)


__all__ = [
    "UNCOMPRESSED_TASK",
    "RaySweepResult",
    "TaskFailure",
    "ray_sweep",
    "run_task",
    "worker_threads",
]
