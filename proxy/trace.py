"""An ordering trace, for the tests that prove `fsync: always` keeps its promise.

The contract says an event reaches clients only after the fsync covering it returned. Tests
cannot see that order from outside (a client sees bytes, not fsyncs), so when the variable
`RESUMABLE_PROXY_TRACE` names a directory at start-up, the process appends one line per step
to `<dir>/trace-<pid>.log`, in the order the event loop took the steps:

    W <session> <last event> <commit>   a batch written to the log; fsync <commit> covers it
    F <commit>                          the fsync covering every write up to <commit> returned
    C <session> <last event>            about to write events up to <last event> to a client

`F 0` is the start-up fsync of what an earlier process left in the log. Each line is one
`os.write` on an `O_APPEND` descriptor, so a kill -9 loses at most the step it interrupted.
Without the variable `TRACE` is None and every hook costs one `is None` test.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "RESUMABLE_PROXY_TRACE"


class Trace:
    __slots__ = ("_fd",)

    def __init__(self, directory: Path) -> None:
        path = directory / f"trace-{os.getpid()}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def written(self, session_id: str, last_event: int, commit: int) -> None:
        os.write(self._fd, b"W %s %d %d\n" % (session_id.encode(), last_event, commit))

    def fsynced(self, commit: int) -> None:
        os.write(self._fd, b"F %d\n" % commit)

    def client_write(self, session_id: str, last_event: int) -> None:
        os.write(self._fd, b"C %s %d\n" % (session_id.encode(), last_event))


def _from_environ() -> Trace | None:
    directory = os.environ.get(ENV)
    return Trace(Path(directory)) if directory else None


TRACE = _from_environ()
