"""A relay in a process of its own, for measuring its memory from outside: `python -m
tests.gateway.conformance.relay_process BACKEND_PORT` relays to the back end on that port,
prints the relay's port and serves until killed."""

from __future__ import annotations

import asyncio
import sys

from tests.gateway.test_relay import Harness


async def main(backend_port: int) -> None:
    harness = Harness(backend_port)
    print(await harness.relay.start("127.0.0.1", 0), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
