"""One run at a time in a run folder: ``RUN/.finegrain.lock``, taken atomically before the folder is checked.

The lock file holds who took it (host, pid, the process's start time, the Slurm job id, the command, when). A
second job that finds it is refused in one line naming the holder, unless the holder is gone:

- same host and this very process: an earlier trainer of this process (one set up and dropped, or a notebook's);
- same host, and the pid is dead or now belongs to a later process (start time differs): crashed or killed;
- same Slurm job id: an earlier start of this very job (a requeue, possibly on another node);
- no heartbeat for :data:`STALE_AFTER_S` (the holder rewrites the file's time every :data:`HEARTBEAT_S`):
  a crashed job on another host.

A stale lock is replaced with a warning; a holder releases the file only while it still holds its own token. The
lock is released when training ends, however it ends, and at
interpreter exit; a start that fails before its first step leaves no lock (and no folder it created empty).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from ..errors import DataError

LOCK_NAME = ".finegrain.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0

log = logging.getLogger(__name__)


class RunFolderLocked(DataError, RuntimeError):
    """Another live job holds the run folder."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder_gone(holder: dict, age_s: float) -> str | None:
    """Why the lock's holder is gone (the lock is stale), or None while it may be alive."""
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        return "it was taken earlier in this process (a trainer set up before this one)"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"it was taken by an earlier start of this Slurm job ({job})"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return f"its process {pid} on this host has ended"
        started = _process_start(pid)
        if holder.get("process_start") and started and started != holder["process_start"]:
            return f"its process {pid} has ended (the pid now belongs to another process)"
        return None
    if age_s > STALE_AFTER_S:
        return f"its holder on {holder.get('host')} has not written it for {age_s / 60:.0f} minutes"
    return None


class RunLock:
    """The lock of run folder ``out_dir``: :meth:`acquire` or raise :class:`RunFolderLocked`; :meth:`release`."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.created_folder = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self.token = uuid.uuid4().hex  # the lock file is this lock's while it holds this token

    def _write(self) -> bool:
        """Create the lock file atomically; False when it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        holder = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                  "process_start": _process_start(os.getpid()),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return True

    def _read(self) -> tuple[dict, float]:
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {}, 0.0
        except (OSError, ValueError):
            return {"host": "?", "pid": -1}, time.time() - self.path.stat().st_mtime
        return holder, age

    def acquire(self) -> RunLock:
        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True)
            self.created_folder = True
        for _ in range(3):
            if self._write():
                break
            holder, age = self._read()
            if not holder:
                continue  # released between the two calls
            gone = _holder_gone(holder, age)
            if gone is None:
                self._remove_created_folder()
                raise RunFolderLocked(
                    f"{self.out_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('since', '?')}: {holder.get('command', '?')}); wait for it to end, or choose "
                    f"another train.output_dir (if that job is gone, delete {self.path})")
            log.warning("%s: replacing a stale lock (%s)", self.path, gone)
            self.path.unlink(missing_ok=True)
        else:
            raise RunFolderLocked(f"{self.path}: could not take the lock (another start keeps taking it)")
        self.held = True
        atexit.register(self.release)
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _ours(self) -> bool:
        return self._read()[0].get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._ours():
                    return
                os.utime(self.path)
            except OSError:
                return

    def _remove_created_folder(self) -> None:
        if self.created_folder:
            try:
                self.out_dir.rmdir()  # only when empty
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (once; a no-op when not held), and the run folder if this
        lock created it and it stayed empty."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._ours():  # another start may have replaced a lock it found stale
            self.path.unlink(missing_ok=True)
        self._remove_created_folder()
        atexit.unregister(self.release)
