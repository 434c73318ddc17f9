"""The thread policy: every usable core for the CLI, one left free for the browser beside the app."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import pytest

from embviz import threads
from embviz.cli import main
from embviz.errors import BadInputError
from embviz.threads import ALL, APP, THREADS_ENV, choose_threads, start_at_lower_priority, usable_cores


@pytest.mark.parametrize(("cores", "cli", "app"), [(1, 1, 1), (2, 2, 1), (8, 8, 7)])
def test_the_app_leaves_one_core_to_the_browser(
    cores: int, cli: int, app: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert choose_threads(ALL, cores) == cli
    assert choose_threads(APP, cores) == app


@pytest.mark.parametrize(("cores", "torch_threads", "slots"), [(2, 1, 2), (2, 2, 1), (8, 3, 2), (1, 4, 1)])
def test_task_slots_fit_tasks_of_torch_threads_on_the_cores(
    cores: int, torch_threads: int, slots: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: torch_threads)
    assert threads.task_slots(cores) == slots


def test_the_environment_overrides_and_bad_values_are_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_threads(APP, 2) == 3 and choose_threads(ALL, 16) == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(BadInputError, match=THREADS_ENV):
            choose_threads(ALL)


def test_usable_cores_follow_the_affinity() -> None:
    assert 1 <= usable_cores() <= 4096


@pytest.mark.parametrize(
    ("policy", "env", "expected"), [("all", None, None), ("app", "1", 1), ("all", "2", 2)]
)
def test_a_fresh_process_sets_torch_threads_once(policy: str, env: str | None, expected: int | None) -> None:
    code = (
        "import torch; from embviz.threads import configure_threads, choose_threads;"
        f"n = configure_threads({policy!r}); configure_threads('app' if {policy!r} == 'all' else 'all');"
        "print(n, torch.get_num_threads())"
    )
    environment = {THREADS_ENV: env} if env else {}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != THREADS_ENV}, **environment},
        check=True,
        timeout=120,
    )
    chosen, torch_threads = map(int, result.stdout.split())
    assert chosen == torch_threads == (expected or usable_cores())


def test_a_bad_thread_count_stops_the_cli_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(threads, "_CHOSEN", {})  # a new process: nothing chosen yet
    monkeypatch.setenv(THREADS_ENV, "many")
    assert main(["methods"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"embviz: error: {THREADS_ENV} must be a positive integer, got 'many'"
    )


def test_faiss_and_numba_follow_the_choice_in_every_thread() -> None:
    """faiss's OpenMP and numba read their thread counts when they load; a server's worker thread (where the
    app's background jobs run) must see the chosen count too, not one per core."""
    code = (
        "import threading; from embviz.threads import configure_threads; configure_threads('all')\n"
        "from embviz.metrics import nearest_neighbours; import numpy as np\n"
        "out = {}\n"
        "def work():\n"
        "    nearest_neighbours(np.random.default_rng(0).normal(size=(50, 4)).astype('float32'), 3)\n"
        "    import faiss, numba; out['n'] = (faiss.omp_get_max_threads(), numba.get_num_threads())\n"
        "t = threading.Thread(target=work); t.start(); t.join(); print(*out['n'])"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**environment, THREADS_ENV: "1"},
        check=True,
        timeout=120,
    )
    assert result.stdout.split() == ["1", "1"]


def _report_niceness(sender: Connection) -> None:
    sender.send(os.nice(0))
    sender.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_a_child_started_at_lower_priority_runs_lowered_while_this_process_does_not() -> None:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_report_niceness, args=(sender,))
    before = os.nice(0)
    start_at_lower_priority(child, 3)
    sender.close()
    try:
        assert receiver.recv() == min(19, before + 3)
    finally:
        child.join(timeout=30)
    assert os.nice(0) == before  # neither this thread nor the process was lowered
    assert child.exitcode == 0


def test_lowering_this_thread_leaves_the_others_alone() -> None:
    before, found = os.nice(0), []
    worker = threading.Thread(target=lambda: found.append((threads.lower_this_thread(2), os.nice(0))))
    worker.start()
    worker.join(timeout=30)
    if sys.platform.startswith("linux"):
        assert found == [(True, min(19, before + 2))]
    else:
        assert found == [(False, before)]
    assert os.nice(0) == before
    assert threads.lower_this_thread(0) is False


def _exited(pid: int) -> bool:
    """Gone, or a zombie that nobody has reaped yet (it ran its last instruction)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_watching_its_parent_ends_when_the_parent_is_killed() -> None:
    watched = (
        "import sys, time\n"
        "from embviz.threads import exit_when_parent_dies\n"
        "exit_when_parent_dies(int(sys.argv[1]), 0.1)\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {watched!r}, str(os.getpid())])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    middle = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert middle.stdout is not None
        child = int(middle.stdout.readline())
        time.sleep(2.0)  # the child's interpreter is up and watching
        assert not _exited(child)
        middle.kill()  # SIGKILL: no chance to stop its child
        middle.wait(timeout=30)
        deadline = time.monotonic() + 20
        while not _exited(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _exited(child), "the child outlived its killed parent"
    finally:
        middle.kill()
