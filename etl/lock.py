"""One process at a time on a local warehouse, said at once.

The local profile keeps its metastore in an embedded Derby database, which admits one JVM: a
second process used to fail minutes later in thousands of lines of Derby errors. Every command
that opens the metastore first takes an exclusive `flock` on `<warehouse>/.realsyn.lock` and
writes who holds it (run id, host, pid, command, start time) into the file.

The kernel drops a flock when its process dies, so a lock can never be left held by a dead run; the
holder record it leaves behind (the file is emptied on a clean release) tells the next taker that
the previous run was abandoned, and who it was.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".realsyn.lock"


@dataclass(frozen=True)
class Holder:
    run_id: str
    command: str
    host: str
    pid: int
    started_at: str
    stage: str | None = None  # the stage a `run` was in, kept current by the runner
    error: str | None = None  # why it died, when it knew (Spark's reason for stopping the context)

    def describe(self) -> str:
        where = f", in stage {self.stage}" if self.stage else ""
        return (f"`realsyn {self.command}` (run {self.run_id}, pid {self.pid} on {self.host}, "
                f"since {self.started_at}{where})")


class WarehouseBusy(RuntimeError):
    def __init__(self, warehouse: Path, holder: Holder | None):
        who = holder.describe() if holder else "another process"
        super().__init__(
            f"warehouse {warehouse} is in use by {who}; the embedded Derby metastore admits one "
            "process at a time: wait for it (`realsyn run --wait`), or use a shared metastore "
            "(docs/architecture.md, 'Concurrency')")
        self.holder = holder


def _read_holder(f) -> Holder | None:
    f.seek(0)
    text = f.read()
    try:
        return Holder(**json.loads(text)) if text.strip() else None
    except (ValueError, TypeError):
        return None


class HeldLock:
    """The lock while held: who held it before and died (`abandoned`), and the stage now running."""

    def __init__(self, f, me: Holder, abandoned: Holder | None):
        self._f, self.me, self.abandoned = f, me, abandoned
        self.died = False
        self._write(me)

    def mark_died(self, error: str | None = None) -> None:
        """Leave this holder's record behind on release, so the next taker reports it abandoned
        (the run could not record its own end: its JVM or SparkContext is gone), with `error`."""
        self.died = True
        if error:
            self.me = replace(self.me, error=error)
            self._write(self.me)

    def set_stage(self, stage: str | None) -> None:
        self.me = replace(self.me, stage=stage)
        self._write(self.me)

    def _write(self, holder: Holder | None) -> None:
        self._f.seek(0)
        self._f.truncate()
        if holder is not None:
            self._f.write(json.dumps(asdict(holder)))
        self._f.flush()


@contextmanager
def warehouse_lock(warehouse: str | Path, run_id: str, command: str, *, wait: bool = False,
                   poll_s: float = 2.0, on_wait: Callable[[Holder | None], None] | None = None,
                   ) -> Iterator[HeldLock]:
    """Hold the warehouse's lock for the `with` block.

    Raises WarehouseBusy at once when another live process holds it, unless `wait`: then polls
    every `poll_s` seconds, calling `on_wait(holder)` once, until it is free.
    """
    path = Path(warehouse)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "r+") as f:
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(f)
                if not wait:
                    raise WarehouseBusy(path.resolve(), holder) from None
                if not told and on_wait is not None:
                    on_wait(holder)
                    told = True
                time.sleep(poll_s)
        me = Holder(run_id=run_id, command=command, host=socket.gethostname(), pid=os.getpid(),
                    started_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
        held = HeldLock(f, me, abandoned=_read_holder(f))
        try:
            yield held
        finally:
            if not held.died:
                held._write(None)
            fcntl.flock(f, fcntl.LOCK_UN)


def current_holder(warehouse: str | Path) -> Holder | None:
    """Who holds the lock now (None when free or unknown), without taking it."""
    path = Path(warehouse) / LOCK_NAME
    if not path.exists():
        return None
    with open(path, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(f)
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
