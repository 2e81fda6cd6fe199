"""The event loop every long-running command runs on: uvloop when it is installed (the `fast`
extra), asyncio's own otherwise. The relay is event-loop bound, so this is the one choice
that moves CPU per event most; both loops pass the whole suite."""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
