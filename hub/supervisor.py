"""What ``giftcard serve --workers N``'s parent process does: keep N web workers serving.

- A worker that dies (a crash, the OOM killer, a SIGKILL) is replaced at once, and its live
  gauges in the Prometheus folder are marked dead, so ``/metrics`` stops answering for it.
- SIGTERM or SIGINT: every worker stops accepting, finishes the requests in flight (up to its
  shutdown timeout) and exits; then the supervisor does.
- SIGHUP: a fresh worker is started for each one running (new code, reopened pools); each time
  one of them is serving, an old one drains and stops, so capacity never drops.
- Workers that die before serving, ``FAILED_STARTS_MAX`` times in a row (a port taken, a database
  that refuses the role), stop everything with exit 1: restarting them forever would hide it.

Each worker holds one end of a socket pair: it writes once when it is serving, and sees the
other end close when the supervisor is gone (killed outright, it could not stop its workers).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from prometheus_client.multiprocess import mark_process_dead

log = logging.getLogger(__name__)

FAILED_STARTS_MAX = 5
SERVING = b"serving"


@dataclass
class Worker:
    process: multiprocessing.Process
    link: Connection  # the supervisor's end of the pair
    serving: bool = False
    stopping: bool = False  # asked to stop: not replaced when it exits
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs ``target(*args, link)`` in ``count`` processes until SIGTERM or SIGINT."""

    def __init__(
        self,
        target: Callable[..., None],
        args: tuple,
        count: int,
        *,
        stop_timeout_s: float,
        name: str = "giftcard-worker",
    ) -> None:
        self._target = target
        self._args = args
        self._count = count
        self._stop_timeout_s = stop_timeout_s
        self._name = name
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[Worker] = []
        self._to_retire: list[Worker] = []  # running, replaced by SIGHUP: each stops once a new one serves
        self._signals: list[int] = []
        self._failed_starts = 0
        self._started = 0

    def run(self) -> int:
        wakeup, wakeup_writer = socket.socketpair()
        for end in (wakeup, wakeup_writer):
            end.setblocking(False)
        previous_wakeup_fd = signal.set_wakeup_fd(wakeup_writer.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda signum, frame: self._signals.append(signum))
        try:
            for _ in range(self._count):
                self._start_worker()
            return self._supervise(wakeup)
        finally:
            signal.set_wakeup_fd(previous_wakeup_fd)
            wakeup.close()
            wakeup_writer.close()

    def _supervise(self, wakeup: socket.socket) -> int:
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self._replace_all()
                else:
                    self._stop_all()
                    return 0
            sentinels = {w.process.sentinel: w for w in self._workers}
            links = {w.link: w for w in self._workers if not w.serving}
            for ready in wait([wakeup, *sentinels, *links]):
                if ready is wakeup:
                    _drain(wakeup)
                elif ready in links:
                    self._note_serving(links[ready])
            for worker in [w for w in self._workers if not w.process.is_alive()]:
                self._reap(worker)
                if self._failed_starts >= FAILED_STARTS_MAX:
                    log.error("%d workers in a row died before serving; serve stops", self._failed_starts)
                    self._stop_all()
                    return 1

    def _start_worker(self) -> None:
        mine, theirs = self._context.Pipe(duplex=True)
        self._started += 1
        process = self._context.Process(
            target=self._target, args=(*self._args, theirs), name=f"{self._name}-{self._started}"
        )
        process.start()
        theirs.close()  # the worker holds it now: its end closing tells us nothing we need
        self._workers.append(Worker(process, mine))

    def _note_serving(self, worker: Worker) -> None:
        try:
            worker.serving = worker.link.recv_bytes() == SERVING
        except (EOFError, OSError):
            return  # it died before serving: its sentinel says so too
        self._failed_starts = 0
        if self._to_retire:
            self._ask_to_stop(self._to_retire.pop(0))

    def _reap(self, worker: Worker) -> None:
        worker.process.join()
        worker.link.close()
        self._workers.remove(worker)
        if worker in self._to_retire:
            self._to_retire.remove(worker)  # died before its replacement served: it still needs none
        # Its live gauges (projection lag, breaker states) stop counting; its counters stay in the sums.
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            mark_process_dead(worker.process.pid)
        if worker.stopping:
            return
        if not worker.serving:
            self._failed_starts += 1
        log.warning(
            "worker %d exited (%s) after %.1f s; starting another",
            worker.process.pid,
            _exit_reason(worker.process.exitcode),
            time.monotonic() - worker.started_at,
        )
        self._start_worker()

    def _replace_all(self) -> None:
        current = [w for w in self._workers if not w.stopping and w not in self._to_retire]
        log.info("SIGHUP: replacing %d worker(s)", len(current))
        self._to_retire.extend(current)
        for _ in current:
            self._start_worker()

    def _ask_to_stop(self, worker: Worker) -> None:
        worker.stopping = True
        if worker.process.is_alive():
            os.kill(worker.process.pid, signal.SIGTERM)  # it stops accepting, then drains

    def _stop_all(self) -> None:
        for worker in self._workers:
            self._ask_to_stop(worker)
        deadline = time.monotonic() + self._stop_timeout_s
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning(
                    "worker %d still running %.0f s after SIGTERM; killed", worker.process.pid, self._stop_timeout_s
                )
                worker.process.kill()
                worker.process.join()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                mark_process_dead(worker.process.pid)
            worker.link.close()
        self._workers.clear()


def _drain(wakeup: socket.socket) -> None:
    try:
        while wakeup.recv(64):
            pass
    except BlockingIOError:
        pass


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"
