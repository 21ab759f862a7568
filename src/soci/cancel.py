"""Stopping long work promptly: a cancel token, and worker threads that honour it.

Python delivers SIGINT to the main thread only, and only between bytecodes. Long work (a
zTOC build inflating a 2 GiB layer, a blob upload) therefore runs in daemon worker threads
while the calling thread waits in short, interruptible steps: on ``KeyboardInterrupt`` it
cancels the token, gives the workers a moment to notice (they check it at least once per
chunk, and the native inflater once per 256 KiB of output) and re-raises. Daemon workers
never keep the process alive after that, whatever they are blocked in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: How long an interrupted caller waits for its workers to stop before giving up on them.
GRACE_SECONDS = 1.0


class Cancelled(Exception):
    """The work stopped because its :class:`CancelToken` was cancelled."""

    def __init__(self) -> None:
        super().__init__("cancelled")


class CancelToken:
    """A flag set once, from any thread, that long work polls; callbacks registered with
    :meth:`on_cancel` run when it is set (to reach code that cannot poll, e.g. native loops)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when cancelled (at once if already); returns an unregister."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)

                def remove() -> None:
                    with self._lock:
                        if callback in self._callbacks:
                            self._callbacks.remove(callback)

                return remove
        callback()
        return lambda: None


def run_workers(fn: Callable[[T], R], items: Iterable[T], *, workers: int,
                cancel: CancelToken | None = None) -> list[R]:
    """``[fn(item) for item in items]`` on up to ``workers`` daemon threads, in order.

    The first failure cancels ``cancel`` (so the others stop) and is raised. An exception
    in the calling thread while it waits (``KeyboardInterrupt``) cancels too, waits up to
    :data:`GRACE_SECONDS` for the workers, and propagates.
    """
    todo: Sequence[T] = list(items)
    token = cancel if cancel is not None else CancelToken()
    results: list[R | None] = [None] * len(todo)
    errors: list[BaseException] = []
    lock = threading.Lock()
    next_index = 0
    all_done = threading.Event()
    alive = max(1, min(workers, len(todo)))

    def work() -> None:
        nonlocal next_index, alive
        try:
            while not token.cancelled:
                with lock:
                    if next_index >= len(todo) or errors:
                        return
                    i = next_index
                    next_index += 1
                try:
                    results[i] = fn(todo[i])
                except BaseException as e:  # handed to the waiting thread
                    with lock:
                        errors.append(e)
                    token.cancel()
                    return
        finally:
            with lock:
                alive -= 1
                if alive == 0:
                    all_done.set()

    if not todo:
        return []
    threads = [threading.Thread(target=work, name=f"soci-worker-{n}", daemon=True)
               for n in range(alive)]
    for t in threads:
        t.start()
    try:
        while not all_done.wait(0.1):
            pass
    except BaseException:
        token.cancel()
        all_done.wait(GRACE_SECONDS)
        raise
    if errors:
        # A worker that failed because another one did reports Cancelled: prefer the cause.
        raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
    if token.cancelled:
        raise Cancelled()
    return results  # type: ignore[return-value]
