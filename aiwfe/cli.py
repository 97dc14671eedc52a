"""The `aiwfe` command: run the suite (`up`), one service (`serve`), or probe health."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiwfe.config import ConfigError

SERVICES = ("gateway", "cognitive", "taskproc", "dataplatform")


async def check_health(address: str, service: str, timeout: float) -> str:
    """The grpc.health.v1 status name of `service` at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _serve(name: str) -> None:
    import importlib

    importlib.import_module(f"{name}.__main__")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aiwfe", description="AI Workflow Engine")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start all four services on this machine")
    p_up.add_argument("--config", help="YAML configuration file (default: $AIWFE_CONFIG)")
    p_serve = sub.add_parser("serve", help="run one service in the foreground")
    p_serve.add_argument("service", choices=SERVICES)
    p_health = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    p_health.add_argument("address", help="host:port")
    p_health.add_argument("--service", default="", help="full service name (default: server)")
    p_health.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)

    if args.command == "up":
        from aiwfe.launcher import up

        try:
            raise SystemExit(up(args.config))
        except ConfigError as exc:
            print(f"aiwfe: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.command == "serve":
        _serve(args.service)
        return
    try:
        status = asyncio.run(check_health(args.address, args.service, args.timeout))
    except grpc.aio.AioRpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    print(status)
    raise SystemExit(0 if status == "SERVING" else 1)
