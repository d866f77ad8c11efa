"""A readers-writer lock: many generations at once, or one change to the set of experts.

Generation reads the experts from its routing decision to its last token; an edit writes only twice,
briefly (adding the new expert's key while hiding it, then making it visible), and trains in between
without the lock, so generation goes on while an expert trains. Rollback and unload write: they wait
for the generations in flight, so no expert vanishes mid-answer. Writers are preferred (a waiting
writer stops new readers), a reading thread may read again, and the thread holding the write lock may
also read.
"""

from __future__ import annotations

import threading
from typing import Any


class ReadWriteLock:
    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._depth: dict[int, int] = {}  # reading threads -> how many reads each holds
        self._writer: int | None = None  # thread ident of the writer
        self._writer_depth = 0
        self._writers_waiting = 0
        self.read = _Side(self.acquire_read, self.release_read)
        self.write = _Side(self.acquire_write, self.release_write)

    def acquire_read(self) -> None:
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:  # the writer reads what it writes
                self._writer_depth += 1
                return
            if self._depth.get(me):  # already reading: never queue behind a waiting writer (deadlock)
                self._depth[me] += 1
                return
            self._condition.wait_for(lambda: self._writer is None and not self._writers_waiting)
            self._readers += 1
            self._depth[me] = 1

    def release_read(self) -> None:
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._writer_depth -= 1
                return
            if self._depth.get(me, 0) > 1:
                self._depth[me] -= 1
                return
            if not self._depth.pop(me, 0):
                raise RuntimeError("release_read by a thread that does not hold a read lock")
            self._readers -= 1
            if not self._readers:
                self._condition.notify_all()

    def acquire_write(self) -> None:
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._writer_depth += 1
                return
            self._writers_waiting += 1
            try:
                self._condition.wait_for(lambda: self._writer is None and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer, self._writer_depth = me, 1

    def release_write(self) -> None:
        with self._condition:
            if self._writer != threading.get_ident():
                raise RuntimeError("release_write by a thread that does not hold the write lock")
            self._writer_depth -= 1
            if not self._writer_depth:
                self._writer = None
                self._condition.notify_all()

    @property
    def readers(self) -> int:
        return self._readers


class _Side:
    """A reusable context manager for one side of the lock (`with lock.read:`)."""

    def __init__(self, acquire: Any, release: Any) -> None:
        self._acquire, self._release = acquire, release

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc: object) -> None:
        self._release()
