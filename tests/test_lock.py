"""The run-folder lease (``negbench.lock``): exclusive across processes, broken at once when its
owner on this host is dead (never while it lives), after the TTL when the heartbeat of an owner
on another host stops, never while that heartbeat runs; racing processes never both win, also
while breaking a stale lease. (Through the runner: test_reliability.py's lock tests.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from negbench.lock import LeaseLock, LockBusy, lease


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(path: Path, host: str, pid: int, age_s: float = 0.0, token: str = "old") -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "token": token, "since": 0}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_a_held_lease_is_exclusive_and_released_on_exit(tmp_path):
    path = tmp_path / ".lock"
    with lease(path, ttl=60) as held:
        owner = json.loads(path.read_text())
        assert (owner["host"], owner["pid"], owner["token"]) == (socket.gethostname(), os.getpid(), held.token)
        with pytest.raises(LockBusy, match=f"pid {os.getpid()}"):
            LeaseLock(path, ttl=60).acquire()
    assert not path.exists()
    with lease(path, ttl=60):  # free again
        pass


def test_the_lease_of_a_dead_process_on_this_host_is_broken_at_once(tmp_path):
    path = tmp_path / ".lock"
    write_lease(path, socket.gethostname(), dead_pid())
    with lease(path, ttl=3600) as held:
        assert json.loads(path.read_text())["token"] == held.token
    assert not (tmp_path / ".lock.break").exists()


def test_a_live_process_on_this_host_keeps_its_lease_even_with_an_old_heartbeat(tmp_path):
    path = tmp_path / ".lock"
    write_lease(path, socket.gethostname(), os.getppid(), age_s=10**4)  # e.g. an owner suspended by Ctrl-Z
    with pytest.raises(LockBusy, match=f"pid {os.getppid()}"):
        LeaseLock(path, ttl=60).acquire()


def test_another_hosts_lease_holds_until_its_heartbeat_is_older_than_the_ttl(tmp_path):
    path = tmp_path / ".lock"
    write_lease(path, "node-elsewhere", 1, age_s=5)
    with pytest.raises(LockBusy, match="pid 1 on node-elsewhere"):
        LeaseLock(path, ttl=60).acquire()
    write_lease(path, "node-elsewhere", 1, age_s=120)
    with lease(path, ttl=60):
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_an_empty_lease_counts_as_being_written_until_the_ttl(tmp_path):
    path = tmp_path / ".lock"
    path.write_text("")  # just created by O_EXCL, or left by the earlier flock-based lock
    with pytest.raises(LockBusy):
        LeaseLock(path, ttl=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    with lease(path, ttl=60):
        pass


def test_the_heartbeat_keeps_a_live_lease_fresh(tmp_path):
    path = tmp_path / ".lock"
    with lease(path, ttl=0.4):
        old = time.time() - 10
        os.utime(path, (old, old))
        time.sleep(0.5)  # more than ttl/4: at least one heartbeat
        assert time.time() - path.stat().st_mtime < 0.4
        with pytest.raises(LockBusy):
            LeaseLock(path, ttl=0.4).acquire()


def test_release_leaves_a_lease_that_is_not_ours_alone(tmp_path):
    path = tmp_path / ".lock"
    held = LeaseLock(path, ttl=60)
    held.acquire()
    write_lease(path, "node-elsewhere", 1, token="theirs")  # broken and retaken meanwhile
    held.release()
    assert json.loads(path.read_text())["token"] == "theirs"


def _contend(path: str, start, results) -> None:  # noqa: ANN001 - multiprocessing objects
    start.wait()
    lock = LeaseLock(Path(path), ttl=3600)
    try:
        lock.acquire()
    except LockBusy:
        results.put("busy")
        return
    results.put("won")
    time.sleep(1.0)  # hold it while the others try
    lock.release()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale lease of a dead pid"])
def test_racing_processes_never_both_win(tmp_path, stale):
    path = tmp_path / ".lock"
    if stale:
        write_lease(path, socket.gethostname(), dead_pid())
    context = multiprocessing.get_context("fork")  # file operations only: no torch threads in the children
    start, results = context.Event(), context.Queue()
    procs = [context.Process(target=_contend, args=(str(path), start, results)) for _ in range(6)]
    for proc in procs:
        proc.start()
    start.set()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == ["busy"] * 5 + ["won"]
    assert not path.exists() and not (tmp_path / ".lock.break").exists()
