"""Appends events to a DiskStore forever, printing each event number once `flush()` returned.

Run by `test_recovery.py` and killed with SIGKILL: every number printed must survive.
Usage: python kill9_writer.py DATA_DIR FSYNC_MODE
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from proxy.config import StorageConfig
from proxy.storage.base import SessionMeta
from proxy.storage.disk import DiskStore


async def main(directory: str, fsync: str) -> None:
    store = DiskStore(StorageConfig(dir=Path(directory), fsync=fsync, segment_bytes=64 * 1024))
    await store.start()
    now = time.time_ns()
    store.create(SessionMeta("killed-session", "POST", "/v1/chat", "0" * 64, "", now, now, 200, ()))
    number = 0
    while True:
        for _ in range(5):
            number += 1
            data = b'id: %d\ndata: {"token": %d}\n\n' % (number, number)
            store.append("killed-session", number, data, [len(data)], time.time_ns())
        await store.flush()
        sys.stdout.write(f"{number}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
