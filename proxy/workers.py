"""`server.workers: N`: N processes serving one port, so one box uses all of its cores.

Each worker is a fork of this process that runs the whole proxy (its own event loop,
upstream pool and store connections) on a listening socket of its own, bound with
SO_REUSEPORT: the kernel spreads new connections over the workers. They share nothing but
the Redis store, which is why the config refuses workers on the disk backend; to each other
they are replicas, so a resume that lands on another worker is served exactly as one that
lands on another replica (followed through Redis, stopped through its control stream).

The parent only supervises. Workers start one at a time, so a start-up failure (Redis
unreachable, port taken) prints its one line once and the parent exits with that worker's
code. SIGTERM or SIGINT is forwarded to every worker, each runs the usual graceful shutdown,
and the parent exits 0 once all of them did. A worker that dies on its own (a crash, an OOM
kill) is replaced after RESPAWN_PAUSE; its live sessions end `interrupted` through the
heartbeat sweep of the others, as a dead replica's do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("proxy.workers")

RESPAWN_PAUSE = 1.0  # seconds before a worker that died is replaced
START_TIMEOUT = 60.0  # a worker that neither listens nor exits within this is given up on

Worker = Callable[[Callable[[], None]], int]
"""Runs the proxy in this process, calls its argument once listening, returns the exit code."""


class _Supervisor:
    def __init__(self, count: int, worker: Worker) -> None:
        self._count = count
        self._worker = worker
        self._children: dict[int, int] = {}  # pid -> worker number
        self._stopping = False
        self._ready_read, self._ready_write = os.pipe()

    def run(self, announce: Callable[[], None]) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for number in range(self._count):
            failed = self._start(number)
            if failed is not None:
                self._forward(signal.SIGTERM, None)
                self._wait_all()
                return failed
            if self._stopping:
                return self._wait_all()
        announce()
        return self._supervise()

    def _spawn(self, number: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                # Until the proxy installs its own handlers (graceful shutdown), a stop
                # request finds nothing to finish: leave at once, cleanly.
                signal.signal(signal.SIGTERM, _exit_now)
                signal.signal(signal.SIGINT, _exit_now)
                os.close(self._ready_read)
                code = self._worker(lambda: os.write(self._ready_write, b"."))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._children[pid] = number
        return pid

    def _start(self, number: int) -> int | None:
        """Fork worker `number` and wait until it listens; its exit code if it died first."""
        pid = self._spawn(number)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not self._stopping:
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select([self._ready_read], [], [], 0.1)
                if readable:
                    os.read(self._ready_read, 1)
                    return None
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self._children.pop(pid, None)
                return os.waitstatus_to_exitcode(status) or 1
        if self._stopping:
            return None
        log.error("worker %d did not listen within %.0fs", number, START_TIMEOUT)
        return 1

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._stopping = True
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _supervise(self) -> int:
        """Replace workers that die, until a signal says stop; then wait for the rest."""
        while not self._stopping:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            number = self._children.pop(pid, None)
            if number is None or self._stopping:
                continue
            log.error(
                "worker %d (pid %d) exited with %d; starting another in %.0fs",
                number,
                pid,
                os.waitstatus_to_exitcode(status),
                RESPAWN_PAUSE,
            )
            time.sleep(RESPAWN_PAUSE)
            if not self._stopping:
                self._spawn(number)
        return self._wait_all()

    def _wait_all(self) -> int:
        """Wait for every worker; 0 when each of them shut down cleanly."""
        worst = 0
        while self._children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if self._children.pop(pid, None) is not None:
                code = os.waitstatus_to_exitcode(status)
                worst = worst or (code if code >= 0 else 128 - code)  # killed: 128 + signal
        return worst


def _exit_now(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    os._exit(0)


def supervise(count: int, worker: Worker, announce: Callable[[], None]) -> int:
    """Run `count` workers until SIGTERM/SIGINT; the exit code for the parent."""
    return _Supervisor(count, worker).run(announce)
