"""A relay and its echo back end in a process of their own, for measuring its memory from
outside: `python -m tests.gateway.conformance.relay_process` prints the relay's port and
serves until killed."""

from __future__ import annotations

import asyncio

from tests.gateway.test_relay import Harness, _backend


async def main() -> None:
    server, _, port = await _backend()
    harness = Harness(port)
    print(await harness.relay.start("127.0.0.1", 0), flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
