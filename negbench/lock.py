"""An exclusive lock on a run folder that holds across processes *and machines*, including on
NFS: a lease file created atomically with ``O_CREAT | O_EXCL``.

Why not ``fcntl.flock``: it is reliable on a local disk, but on a network file system it is
only as good as the mount. On NFS mounted with ``nolock`` (or Lustre with ``localflock``)
flock locks are local to each client, so two nodes both "hold" the lock; on other mounts a
client that loses its lease silently loses the lock. ``O_EXCL`` creation is atomic on local
disks and on NFSv3/v4 (Linux ≥ 2.6.5), so exactly one creator wins everywhere.

The lease file holds its owner's ``host``, ``pid`` and a random ``token``; the owner refreshes
its modification time every ``ttl / 4`` seconds from a daemon thread (the *heartbeat*). A lease
is **stale**, and is broken by the next process that wants the folder, when

    its owner ran on this host and that pid is gone (or a zombie) — detected at once, so a
    SIGKILLed worker's cell can be resumed immediately (a live pid on this host is never
    taken over: a suspended owner must not find its folder shared when it resumes); or
    its owner ran on another host and its heartbeat is older than ``ttl`` (default
    :data:`DEFAULT_TTL_S`, or ``$NEGBENCH_LOCK_TTL``) — that owner died or lost the folder.

Breaking takes a second ``O_EXCL`` file (``<lock>.break``) so that two breakers cannot both
delete a lease, and deletes the lease only if it still carries the token judged stale. The
clocks of the hosts sharing the folder must agree to well within ``ttl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: seconds without a heartbeat after which a lease held on another host counts as abandoned
DEFAULT_TTL_S = 120.0


class LockBusy(Exception):
    """Another live process holds the lease."""

    def __init__(self, path: Path, owner: dict[str, Any] | None) -> None:
        who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
        super().__init__(f"{path} is held by {who}")
        self.owner = owner


def ttl_seconds() -> float:
    """The lease lifetime: ``$NEGBENCH_LOCK_TTL`` if set (a positive number), else the default."""
    text = os.environ.get("NEGBENCH_LOCK_TTL")
    try:
        value = float(text) if text else DEFAULT_TTL_S
    except ValueError:
        value = DEFAULT_TTL_S
    return value if value > 0 else DEFAULT_TTL_S


def _read(path: Path) -> dict[str, Any] | None:
    """The lease's owner record, or None when it is empty or not (yet) valid JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_stale(path: Path, owner: dict[str, Any] | None, ttl: float) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: just try again
    if owner is None:  # being written this instant, or a leftover of an old flock-based version
        return age > ttl
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        # a live pid here is never taken over, even with an old heartbeat: a suspended owner
        # (Ctrl-Z) must not find its folder shared when it resumes; a reused pid only blocks
        return not _pid_alive(owner["pid"])
    return age > ttl


def _break(path: Path, stale_token: object, ttl: float) -> None:
    """Delete the lease at ``path`` if it still carries ``stale_token`` (one breaker at a time)."""
    breaker = path.with_name(path.name + ".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):  # a breaker that died while breaking
            if time.time() - breaker.stat().st_mtime > ttl:
                breaker.unlink()
        return
    os.close(fd)
    try:
        current = _read(path)
        if (current or {}).get("token") == stale_token:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


class LeaseLock:
    """An exclusive lease on ``path`` (see the module docstring). Use :func:`lease`."""

    def __init__(self, path: Path, ttl: float | None = None) -> None:
        self.path = Path(path)
        self.ttl = ttl_seconds() if ttl is None else ttl
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease now or raise :class:`LockBusy` (a stale lease is broken first)."""
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                             "since": time.time()}).encode()
        for _ in range(3):  # break a stale lease, then retry the atomic create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                if not _is_stale(self.path, owner, self.ttl):
                    raise LockBusy(self.path, owner) from None
                _break(self.path, (owner or {}).get("token"), self.ttl)
                continue
            try:
                os.write(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._thread = threading.Thread(target=self._heartbeat, name="negbench-lease", daemon=True)
            self._thread.start()
            return
        raise LockBusy(self.path, _read(self.path))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def lease(path: Path, ttl: float | None = None) -> Iterator[LeaseLock]:
    """Hold an exclusive lease on ``path`` for the ``with`` block; :class:`LockBusy` at once
    when a live process holds it."""
    lock = LeaseLock(path, ttl)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
