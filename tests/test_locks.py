"""lemoe.locks.ReadWriteLock: every path (readers together, writers alone, writer preference, the writer
reading and nesting, misuse)."""

from __future__ import annotations

import threading
import time

import pytest

from lemoe.locks import ReadWriteLock


def _in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_readers_share_the_lock():
    lock = ReadWriteLock()
    inside, release = threading.Barrier(3), threading.Event()

    def read():
        with lock.read:
            inside.wait(timeout=10)  # all three readers are inside at once, or this times out
            release.wait(timeout=10)

    threads = [_in_thread(read) for _ in range(2)]
    inside.wait(timeout=10)
    assert lock.readers == 2
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert lock.readers == 0


def test_a_writer_waits_for_readers_and_readers_wait_for_a_writer():
    lock = ReadWriteLock()
    order: list[str] = []
    lock.acquire_read()
    writer = _in_thread(lambda: (lock.acquire_write(), order.append("write"), lock.release_write()))
    time.sleep(0.2)
    assert order == []  # blocked by the reader
    order.append("read done")
    lock.release_read()
    writer.join(timeout=10)
    assert order == ["read done", "write"]

    lock.acquire_write()
    reader = _in_thread(lambda: (lock.acquire_read(), order.append("read"), lock.release_read()))
    time.sleep(0.2)
    assert order[-1] == "write"  # blocked by the writer
    lock.release_write()
    reader.join(timeout=10)
    assert order[-1] == "read"


def test_a_waiting_writer_stops_new_readers():
    lock = ReadWriteLock()
    order: list[str] = []
    lock.acquire_read()
    writer = _in_thread(lambda: (lock.acquire_write(), order.append("write"), lock.release_write()))
    time.sleep(0.2)
    late_reader = _in_thread(lambda: (lock.acquire_read(), order.append("late read"), lock.release_read()))
    time.sleep(0.2)
    assert order == []  # the late reader queues behind the waiting writer
    lock.release_read()
    writer.join(timeout=10)
    late_reader.join(timeout=10)
    assert order == ["write", "late read"]


def test_the_writer_may_read_and_nest_and_only_it_may_release():
    lock = ReadWriteLock()
    with lock.write:
        with lock.read:  # no deadlock: the writer reads what it writes
            with lock.write:
                pass
        assert lock.readers == 0
    with pytest.raises(RuntimeError, match="does not hold the write lock"):
        lock.release_write()
    acquired = threading.Event()
    _in_thread(lambda: (lock.acquire_write(), acquired.set(), lock.release_write())).join(timeout=10)
    assert acquired.is_set()  # fully released after nesting


def test_a_reader_may_read_again_while_a_writer_waits():
    lock = ReadWriteLock()
    lock.acquire_read()
    writer = _in_thread(lambda: (lock.acquire_write(), lock.release_write()))
    time.sleep(0.2)
    lock.acquire_read()  # would deadlock if it queued behind the waiting writer
    lock.release_read()
    assert writer.is_alive()  # still one read held
    lock.release_read()
    writer.join(timeout=10)
    assert not writer.is_alive()
    with pytest.raises(RuntimeError, match="does not hold a read lock"):
        lock.release_read()
