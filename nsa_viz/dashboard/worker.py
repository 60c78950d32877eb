"""One background thread for the dashboard's long work, so the page never waits on the model.

Jobs are named; submitting a job while another of the same name waits replaces the waiting one (a
slider dragged over ten values computes the last one, not all ten). Jobs run one at a time: they
share one model, and capture refuses to run twice at once on a model. Whatever a job prints (progress
bars of model loading, library warnings) is kept in ``Worker.log`` instead of landing on the page.
"""
from __future__ import annotations

import contextlib
import io
import threading
import time
import traceback
from collections import OrderedDict
from typing import Callable, Optional


class Job:
    def __init__(self, name: str, fn: Callable, on_done: Callable, on_error: Callable, label: str):
        self.name, self.fn, self.on_done, self.on_error, self.label = name, fn, on_done, on_error, label
        self.started: Optional[float] = None


class Worker:
    """Runs submitted jobs in order on one daemon thread (or inline with ``synchronous=True``, for tests).

    ``on_busy(label or None, seconds)`` is called when a job starts, about once a second while it runs
    and with None when the queue is empty: the app shows it as the status line.
    """

    def __init__(self, on_busy: Callable[[Optional[str], float], None] = lambda *_: None, synchronous: bool = False):
        self.on_busy = on_busy
        self.synchronous = synchronous
        self._pending: "OrderedDict[str, Job]" = OrderedDict()
        self._cv = threading.Condition()
        self._current: Optional[Job] = None
        self._thread: Optional[threading.Thread] = None
        self.log = io.StringIO()
        self.last_traceback = ""
        self.completed = 0

    # ------------------------------------------------------------------ public
    def submit(self, name: str, fn: Callable, on_done: Callable = lambda result: None,
               on_error: Callable = lambda exc: None, label: str = "") -> None:
        """Queue ``fn()``; then ``on_done(result)`` or ``on_error(exception)`` on the worker thread."""
        job = Job(name, fn, on_done, on_error, label or name)
        if self.synchronous:
            self._run(job)
            return
        with self._cv:
            self._pending.pop(name, None)
            self._pending[name] = job
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nsa-viz-dashboard", daemon=True)
                self._thread.start()
                threading.Thread(target=self._tick, name="nsa-viz-dashboard-ticker", daemon=True).start()
            self._cv.notify_all()

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._current is not None or bool(self._pending)

    def wait(self, timeout: float = 600.0) -> bool:
        """Block until every queued job finished (tests, scripts); False on timeout."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._current is not None or self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.5))
        return True

    # ------------------------------------------------------------------ thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                _, job = self._pending.popitem(last=False)
                self._current = job
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._current = None
                    idle = not self._pending
                    self._cv.notify_all()
                if idle:
                    self._safe(self.on_busy, None, 0.0)

    def _tick(self) -> None:
        while True:
            time.sleep(1.0)
            with self._cv:
                job = self._current
            if job is not None and job.started is not None:
                self._safe(self.on_busy, job.label, time.monotonic() - job.started)

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        self._safe(self.on_busy, job.label, 0.0)
        buf = io.StringIO()
        try:
            # progress bars and warnings of the libraries would otherwise print onto the page
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
                result = job.fn()
        except Exception as exc:  # shown in the page as a message; the traceback is kept for debugging
            self.last_traceback = traceback.format_exc()
            self._keep(buf)
            self._safe(job.on_error, exc)
        else:
            self._keep(buf)
            self._safe(job.on_done, result)
        self.completed += 1
        if self.synchronous:
            self._safe(self.on_busy, None, 0.0)

    def _keep(self, buf: io.StringIO) -> None:
        text = buf.getvalue()
        if text:
            self.log.write(text[-20000:])

    def _safe(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # a failing callback must not kill the worker thread
            self.last_traceback = traceback.format_exc()


__all__ = ["Worker"]
