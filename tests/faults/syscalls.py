"""The proxy's system calls, as `strace -f` saw them, for ordering proofs.

A kill -9 loop shows what survives a crash, but whether it survives can hinge on a race of
microseconds (was the record written before the kill landed?). The order of system calls
settles it for every run: a DELETE record is written, then fsynced, and only then is the 200
sent and any segment it frees unlinked. Wrong code fails this check every time, not once in
a while.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.storage.records import DELETE, HEADER

from ..helpers import missing_tool

STRACE = shutil.which("strace")
TRACED = "trace=write,writev,sendto,sendmsg,fsync,fdatasync,unlink,unlinkat,openat,close"
_LINE = re.compile(r"^(\d+) +(.*)$")
_CALL = re.compile(r"^([a-z0-9_]+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_RESULT = re.compile(r"\) += (-?\d+)")


def _unusable() -> str | None:
    """Why strace cannot trace here (missing, or ptrace/seccomp refused), or None."""
    if STRACE is None:
        return "strace is not installed (Debian: apt-get install strace)"
    probe = subprocess.run(
        [STRACE, "-f", "--seccomp-bpf", "-qq", "-e", "trace=write", "-o", os.devnull, "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.strip()[:200]}"
    return None


def strace_prefix(output: Path) -> list[str]:
    """The command prefix that runs a process under strace, writing `output`."""
    reason = _unusable()
    if reason is not None:
        missing_tool(reason)
    assert STRACE is not None
    return [
        STRACE,
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-xx",
        "-s",
        "4194304",
        "-e",
        TRACED,
        "-e",
        "signal=none",
        "-o",
        str(output),
    ]


def traced_child(strace_pid: int) -> int:
    """The pid strace runs (signals go to it: killing strace would leave it running)."""
    for _ in range(200):
        children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children")
        if children.exists() and children.read_text().split():
            return int(children.read_text().split()[0])
        os.sched_yield()
    raise RuntimeError("strace started no child")


def stop(strace_pid: int) -> None:
    """SIGTERM the traced proxy (it exits 0 after its shutdown); strace then exits."""
    os.kill(traced_child(strace_pid), signal.SIGTERM)


@dataclass
class Call:
    index: int  # line of its entry (writes hand over their data there)
    done: int  # line of its exit (an fsync has returned there)
    name: str
    args: str
    result: int

    @property
    def data(self) -> bytes:
        return b"".join(bytes.fromhex(s.replace("\\x", "")) for s in _STRING.findall(self.args))

    @property
    def fd(self) -> int:
        return int(re.split(r"[,)]", self.args, maxsplit=1)[0])


def calls(trace: Path) -> Iterator[Call]:
    """Every traced call, complete, in the order of its entry (unfinished/resumed joined)."""
    pending: dict[str, tuple[int, str, str]] = {}
    finished: list[Call] = []
    for index, raw in enumerate(trace.read_text(errors="replace").splitlines()):
        match = _LINE.match(raw)
        if match is None:
            continue
        tid, rest = match.groups()
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            if tid not in pending:
                continue
            start, name, head = pending.pop(tid)
            args, done = head + resumed.group(2), index
        else:
            call = _CALL.match(rest)
            if call is None:
                continue
            name, args = call.groups()
            if args.endswith("<unfinished ...>"):
                pending[tid] = (index, name, args.removesuffix("<unfinished ...>"))
                continue
            start, done = index, index
        result = _RESULT.search(args)
        finished.append(Call(start, done, name, args, int(result.group(1)) if result else -1))
    finished.sort(key=lambda call: call.index)
    yield from finished


def records(data: bytes) -> Iterator[tuple[int, str]]:
    """(type, session id) of each whole, valid record framed in one write to a segment."""
    pos = 0
    while pos + HEADER.size <= len(data):
        crc, length, rtype = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if end > len(data) or zlib.crc32(data[pos + 4 : end]) != crc:
            return
        key_length = data[pos + HEADER.size]
        session_id = data[pos + HEADER.size + 1 : pos + HEADER.size + 1 + key_length]
        yield rtype, session_id.decode("ascii")
        pos = end


@dataclass
class LogTrace:
    """What the trace says about the log: who wrote where, and when deletes became durable."""

    holders: dict[str, set[str]] = field(default_factory=dict)  # segment name -> sessions
    unlinked: dict[str, int] = field(default_factory=dict)  # segment name -> line
    deleted_at: dict[str, int] = field(default_factory=dict)  # session -> line of its DELETE
    fsynced: list[int] = field(default_factory=list)  # lines where an fsync returned
    sent: list[tuple[int, bytes]] = field(default_factory=list)  # socket writes

    def durable_at(self, session_id: str) -> int | None:
        """The line where the first fsync after the session's DELETE write returned."""
        written = self.deleted_at.get(session_id)
        if written is None:
            return None
        return next((line for line in self.fsynced if line > written), None)


def _segment_name(call: Call) -> str | None:
    """The file name of a segment (`*.log`) named by the call's path argument, if any."""
    found = _STRING.search(call.args)
    if found is None:
        return None
    name = Path(bytes.fromhex(found.group(1).replace("\\x", "")).decode("latin-1")).name
    return name if name.endswith(".log") else None


def read_log_trace(trace: Path) -> LogTrace:
    result = LogTrace()
    names: dict[int, str] = {}  # open fd -> segment file name
    for call in calls(trace):
        if call.name == "openat":
            name = _segment_name(call)
            if name is not None and call.result >= 0:
                names[call.result] = name
        elif call.name == "close":
            names.pop(call.fd, None)
        elif call.name in ("fsync", "fdatasync") and call.result == 0:
            result.fsynced.append(call.done)
        elif call.name in ("unlink", "unlinkat"):
            name = _segment_name(call)
            if name is not None and call.result == 0:
                result.unlinked[name] = call.index
        elif call.name in ("write", "writev", "sendto", "sendmsg"):
            segment = names.get(call.fd)
            if segment is None:
                result.sent.append((call.index, call.data))
                continue
            for rtype, session_id in records(call.data):
                result.holders.setdefault(segment, set()).add(session_id)
                if rtype == DELETE:
                    result.deleted_at.setdefault(session_id, call.index)
    result.fsynced.sort()
    return result


def check_unlinks_follow_durable_deletes(log: LogTrace) -> int:
    """Every unlinked segment: each session that wrote to it had its DELETE record written
    and fsynced before the unlink. Returns how many unlinks were checked."""
    for segment, line in log.unlinked.items():
        for session_id in log.holders.get(segment, set()):
            durable = log.durable_at(session_id)
            assert durable is not None and durable < line, (
                f"{segment} was unlinked (trace line {line}) before the DELETE of session "
                f"{session_id} was durable (written: {log.deleted_at.get(session_id)}, "
                f"fsynced: {durable})"
            )
    return len(log.unlinked)
