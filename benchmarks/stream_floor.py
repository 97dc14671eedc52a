"""What one idle server stream costs grpc.aio itself, printed as JSON (never a timed test):

    python -m benchmarks.stream_floor [--streams 3000] [--layers 1]

A bare grpc.aio server (no interceptor, no protobuf: one unary-stream method whose handler
yields one message and then waits) in a process of its own, and a client process opening
`--streams` streams on it over connections of 100 streams each. Prints the server's RSS
growth per open stream, and its Python share (tracemalloc: what the Python objects take;
the rest is grpc-core's, the HTTP/2 stream and the call). `--layers N` nests the handler in
N async generators (each interceptor or handler layer that re-yields is one). The floor
under taskproc's memory per WatchWorkflow stream (benchmarks.streams): a back end that
serves each watcher with a grpc.aio server call cannot go below it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import grpc

from benchmarks import procstat

PER_CONNECTION = 100
OPENING = 200  # opening at once: a burst of thousands makes grpc-core cancel some


async def _serve(layers: int, traced: bool) -> None:
    forever = asyncio.Event()

    async def bottom(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"x"
        await forever.wait()

    def nest(depth: int) -> Any:
        if depth == 1:
            return bottom

        inner = nest(depth - 1)

        async def layer(request: bytes, context: Any) -> AsyncIterator[bytes]:
            async for item in inner(request, context):
                yield item

        return layer

    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(nest(layers))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("floor.S", {"W": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if traced:
        tracemalloc.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if traced:  # the Python objects still alive, now that every stream is open
        print(tracemalloc.get_traced_memory()[0], flush=True)
    os._exit(0)  # no drain: cancelling thousands of handlers only prints their tracebacks


async def _open(port: int, streams: int) -> None:
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(-(-streams // PER_CONNECTION))
    ]
    opening = asyncio.Semaphore(OPENING)
    calls = []

    async def one(i: int) -> None:
        async with opening:
            call = channels[i // PER_CONNECTION].unary_stream("/floor.S/W")(b"")
            calls.append(call)
            await call.read()

    await asyncio.gather(*(one(i) for i in range(streams)))
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.stream_floor", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def measure(streams: int, layers: int, traced: bool) -> float:
    """KB per stream: the server's RSS growth, or its Python objects' when `traced`."""
    server = _spawn("--serve", "--layers", str(layers), *(["--traced"] if traced else []))
    assert server.stdout is not None and server.stdin is not None
    port = server.stdout.readline().strip()
    time.sleep(1.0)
    before = procstat.rss_mb(server.pid)
    client = _spawn("--client", port, "--streams", str(streams))
    assert client.stdout is not None and client.stdin is not None
    if client.stdout.readline().strip() != "open":
        raise RuntimeError("the client could not open every stream")
    time.sleep(2.0)
    grown = (procstat.rss_mb(server.pid) - before) * 1024
    server.stdin.write("\n")
    server.stdin.flush()
    if traced:
        grown = int(server.stdout.readline()) / 1024
    client.kill()
    server.wait(timeout=30)
    client.wait()
    return round(grown / streams, 2)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=3000)
    parser.add_argument("--layers", type=int, default=1, help="async generators per handler")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve:
        asyncio.run(_serve(opts.layers, opts.traced))
    elif opts.client:
        asyncio.run(_open(opts.client, opts.streams))
    else:
        rss = measure(opts.streams, opts.layers, traced=False)
        python = measure(opts.streams, opts.layers, traced=True)
        print(
            json.dumps(
                {
                    "streams": opts.streams,
                    "layers": opts.layers,
                    "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
                    "rss_kb_per_stream": rss,
                    "python_kb_per_stream": python,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    cli()
