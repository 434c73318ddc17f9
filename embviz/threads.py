"""How many threads torch computes with, chosen once per process from the cores this process may use.

torch's default (one OpenMP thread per core) is right for a quiet process and wrong for the app: the
browser that shows the page runs on the same cores, and OpenMP threads that spin at barriers while the
browser holds a core made the Predictions page 6x slower on a 2-core machine (33-58 s instead of 5-6 s).
So the app leaves one usable core free (:data:`APP`), while the CLI and benchmarks use every usable core
(:data:`ALL`). ``EMBVIZ_THREADS`` overrides both.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Literal

import torch

from embviz.errors import BadInputError

THREADS_ENV = "EMBVIZ_THREADS"
Policy = Literal["all", "app"]
ALL: Policy = "all"
"""Every usable core: a command-line run that has the machine to itself."""
APP: Policy = "app"
"""One usable core left free for the browser that shares the machine with the app's server."""

_LOCK = threading.Lock()
_CHOSEN: dict[str, int] = {}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def choose_threads(policy: Policy, cores: int | None = None) -> int:
    """The thread count for ``policy`` on ``cores`` usable cores (default: this process's), or
    ``EMBVIZ_THREADS`` when set.

    Raises:
        BadInputError: ``EMBVIZ_THREADS`` is set but not a positive integer.
    """
    requested = os.environ.get(THREADS_ENV, "").strip()
    if requested:
        if not requested.isdigit() or int(requested) < 1:
            raise BadInputError(f"{THREADS_ENV} must be a positive integer, got {requested!r}")
        return int(requested)
    cores = usable_cores() if cores is None else cores
    return max(1, cores - 1) if policy == APP else max(1, cores)


OTHER_RUNTIMES = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
"""Thread settings read once, when they load, by the other parallel runtimes embviz uses: faiss's own
OpenMP (and the BLAS it bundles), and numba's (UMAP). A value the user set is kept."""


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per task when ``workers`` tasks share ``cores`` usable cores (default: this process's):
    the cores shared out, at least one (a local Ray cluster's tasks, :mod:`embviz.cluster`)."""
    return max(1, (cores or usable_cores()) // max(1, workers))


def task_slots(cores: int | None = None) -> int:
    """How many tasks, each on this process's torch thread count, the usable cores (default: this process's)
    run side by side: at least one. The app (one torch thread on 2 cores) gets 2, so its background jobs
    (e.g. both variants' neighbour tables, faiss searches that release the GIL) use the core the policy
    leaves the browser while the browser only waits for them; a CLI process at every core gets 1."""
    return worker_threads(torch.get_num_threads(), cores)


def configure_threads(policy: Policy) -> int:
    """Set torch's intra-op threads for this process once (later calls keep the first choice), and the same
    default for faiss's and numba's runtimes that load later (:data:`OTHER_RUNTIMES`); returns it."""
    with _LOCK:
        if "threads" not in _CHOSEN:
            _CHOSEN["threads"] = choose_threads(policy)
            torch.set_num_threads(_CHOSEN["threads"])
            for variable in OTHER_RUNTIMES:
                os.environ.setdefault(variable, str(_CHOSEN["threads"]))
        return _CHOSEN["threads"]


def lower_this_thread(niceness: int) -> bool:
    """Lower the calling thread's scheduling priority by ``niceness`` (Linux, where priority is per thread);
    True when it was lowered. Elsewhere ``nice`` would lower the whole process, so nothing changes there."""
    if not sys.platform.startswith("linux") or niceness <= 0:
        return False
    try:
        os.nice(niceness)
    except OSError:  # no permission or no nice: the thread just keeps its priority
        return False
    return True


def exit_when_parent_dies(parent_pid: int, interval_s: float = 1.0) -> threading.Thread:
    """Watch, from a daemon thread, that this process's parent is still ``parent_pid``; when it is gone
    (killed without a chance to stop its children, e.g. SIGKILL: the process is then re-parented), end this
    process at once. A background child that would otherwise run on for minutes uses it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    watcher = threading.Thread(target=watch, name="embviz-exit-with-parent", daemon=True)
    watcher.start()
    return watcher


def start_at_lower_priority(process: BaseProcess, niceness: int) -> None:
    """Start ``process`` with its scheduling priority lowered by ``niceness``, from its first instruction on.

    A spawned child first starts an interpreter and imports torch and the parent's main module (seconds
    of CPU): lowered only once its target runs, it took the cores from the page in front of the user
    meanwhile. On Linux priority is per thread and a child inherits its starting thread's, so a short-lived
    thread lowers its own priority and starts the child; elsewhere (where ``nice`` is per process) the child
    starts as it is and may lower its own priority once it runs.
    """
    if not sys.platform.startswith("linux"):
        process.start()
        return
    failures: list[BaseException] = []

    def start() -> None:
        lower_this_thread(niceness)  # no permission or no nice: the child is just not deprioritised
        try:
            process.start()
        except BaseException as error:  # re-raised in the caller's thread
            failures.append(error)

    starter = threading.Thread(target=start, name="embviz-start-at-lower-priority")
    starter.start()
    starter.join()
    if failures:
        raise failures[0]
