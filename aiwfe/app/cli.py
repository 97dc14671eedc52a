"""The `aiwfe` command: run the suite (`up`), one service (`serve`), probe health, and drive
the API through the gateway (login, embed, search, workflows, users, ...).

Human output by default, `--json` for scripts. A gRPC error becomes one line on stderr
(`aiwfe: CODE: details`) and exit code 1; bad usage or unreadable input exits 2.

Every command is one handler registered with `@command("group name", ...)`: the decorator
adds its parser (and its group's, printing the group's help when no subcommand is given),
so adding a command is one decorated function. Connection options (`--gateway`, `--json`,
`--timeout`, ...) go before or after the subcommand. API handlers read and check their
input (files, password prompt) before connecting; gRPC, pydantic and the client load only
then, so a prompt appears at once.

Over 600 lines on purpose: one short handler per command (33), each beside its arguments;
they share the helpers above them, and splitting by group would only move the table apart.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message

    from aiwfe.sdk.client import AsyncClient

SERVICES = ("gateway", "cognitive", "taskproc", "dataplatform")
# Bounds on what the CLI reads and sends per call (the server enforces its own too).
MAX_FILE_BYTES = 8 * 1024 * 1024
INDEX_BATCH = 64
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT = 30.0
HEALTH_TIMEOUT = 3.0


class UsageError(Exception):
    """A problem with the command line or its input files (exit code 2)."""


class NotLoggedIn(Exception):
    """The gateway wants credentials and none are stored for it (exit code 1)."""


async def check_health(
    address: str,
    service: str,
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> str:
    """The grpc.health.v1 status name of `service` at `address` (TLS with credentials)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# --- the command table ----------------------------------------------------------------------

Configure = Callable[[argparse.ArgumentParser], object]
Local = Callable[[argparse.Namespace], int]
Connect = Callable[[], AbstractAsyncContextManager["AsyncClient"]]
Api = Callable[[argparse.Namespace, Connect], Awaitable[int]]


@dataclass(frozen=True)
class Command:
    """One command: its words (`("users", "create")`), help, arguments and handler. An
    API handler (`api=True`) is async and gets a `connect()` for the gateway."""

    words: tuple[str, ...]
    help: str
    configure: Configure
    handler: Local | Api
    api: bool


COMMANDS: list[Command] = []
GROUPS: dict[str, str] = {
    "collections": "list, share and delete collections",
    "workflow": "submit and manage workflows",
    "schedule": "run a workflow on a cron schedule in a time zone",
    "users": "manage accounts (admin)",
    "service-account": "manage service accounts for unattended callers (admin)",
    "api-key": "issue, list and revoke service accounts' API keys (admin)",
    "models": "fetch embedding model weights into <home>/models",
    "worker": "serve your own functions as workflow steps",
}


def command(
    words: str, help: str, args: Configure = lambda _: None, api: bool = True
) -> Callable[[Any], Any]:
    """Registers the decorated handler as `aiwfe WORDS`; a group word not in GROUPS gets
    a help line of its own name."""

    def register(handler: Any) -> Any:
        COMMANDS.append(Command(tuple(words.split()), help, args, handler, api))
        return handler

    return register


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command accepts before or after its name. Below the top level
    they default to SUPPRESS, so an option given before the subcommand is not reset."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("connection")
    g.add_argument(
        "--gateway",
        default=default(os.environ.get("AIWFE_GATEWAY", "127.0.0.1:50051")),
        help="gateway host:port (default: $AIWFE_GATEWAY or 127.0.0.1:50051)",
    )
    g.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS")
    g.add_argument(
        "--ca-file", default=default(None), help="PEM CA to verify the server (implies --tls)"
    )
    g.add_argument(
        "--cert-file", default=default(None), help="PEM client certificate for mTLS (implies --tls)"
    )
    g.add_argument("--key-file", default=default(None), help="PEM key of --cert-file")
    g.add_argument(
        "--timeout",
        type=float,
        default=default(None),
        help=f"deadline per call in s (default {DEFAULT_TIMEOUT:g}; health {HEALTH_TIMEOUT:g})",
    )
    g.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    g.add_argument(
        "--credentials",
        default=default(None),
        help="token file (default: $AIWFE_CREDENTIALS or ~/.config/aiwfe/credentials.json)",
    )


def _print_help(parser: argparse.ArgumentParser) -> Local:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    return show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiwfe", description="AI Workflow Engine")
    _connection_options(parser, suppress=False)
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for cmd in COMMANDS:
        where = top
        for word in cmd.words[:-1]:
            if word not in groups:
                group = top.add_parser(word, help=GROUPS.get(word, word))
                _connection_options(group, suppress=True)
                group.set_defaults(handler=_print_help(group), api=False)
                groups[word] = group.add_subparsers(dest=f"{word}_command", metavar="COMMAND")
            where = groups[word]
        p = where.add_parser(cmd.words[-1], help=cmd.help, description=cmd.help)
        _connection_options(p, suppress=True)
        cmd.configure(p)
        p.set_defaults(handler=cmd.handler, api=cmd.api)
    parser.set_defaults(handler=_print_help(parser), api=False)
    return parser


# --- helpers --------------------------------------------------------------------------------


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UsageError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def _password(from_stdin: bool, prompt: str) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("AIWFE_PASSWORD"):
        return os.environ["AIWFE_PASSWORD"]
    if not sys.stdin.isatty():
        raise UsageError("no password: use --password-stdin or set AIWFE_PASSWORD")
    return getpass.getpass(prompt)


def load_workflow_spec(path: Path) -> Any:
    """A WorkflowSpec from a YAML or JSON file (proto JSON field names, either case)."""
    import yaml
    from google.protobuf import json_format

    from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb

    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: must hold a mapping (a WorkflowSpec)")
    try:
        return json_format.ParseDict(data, wf_pb.WorkflowSpec())
    except json_format.ParseError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _as_dict(message: Message) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _emit(args: argparse.Namespace, message: Message, human: Callable[[], str]) -> None:
    print(json.dumps(_as_dict(message)) if args.json else human())


def _enum(message_enum: Any, value: int, prefix: str) -> str:
    return str(message_enum.Name(value)).removeprefix(prefix)


def _time(ts: Any) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def _user_line(user: Any) -> str:
    state = "disabled" if user.disabled else "active"
    return f"{user.username:<24} {','.join(user.roles) or '-':<20} {state:<8} {user.user_id}"


def _collection_line(c: Any) -> str:
    grants = ", ".join(
        (f"user {g.username}" if g.HasField("username") else f"role {g.role}")
        + (" (write)" if g.write else "")
        for g in c.grants
    )
    return (
        f"{c.name}  owner {c.owner}  {c.document_chunk_count} chunks"
        f"  {'read-write' if c.writable else 'read-only'}"
        + (f"  shared with: {grants}" if grants else "")
    )


def _workflow_lines(wf: Any) -> str:
    from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb

    state = _enum(wf_pb.WorkflowState, wf.state, "WORKFLOW_STATE_")
    lines = [f"{wf.workflow_id}  {wf.spec.name or '-'}  {state}  created {_time(wf.create_time)}"]
    for step in wf.steps:
        s = _enum(wf_pb.StepState, step.state, "STEP_STATE_")
        extra = f"  error: {step.error}" if step.error else ""
        lines.append(f"  {step.name:<20} {s:<10} attempts {step.attempts}{extra}")
    if wf.error:
        lines.append(f"  error: {wf.error}")
    return "\n".join(lines)


def _next_page(token: str) -> list[str]:
    return [f"next page: --page-token {token}"] if token else []


def rpc_error_line(exc: grpc.aio.AioRpcError) -> str:
    """One line for a gRPC failure: code, details, and a hint where one helps."""
    import grpc

    details = " ".join((exc.details() or "").split())
    line = f"aiwfe: {exc.code().name}: {details}"
    trailers = dict(exc.trailing_metadata() or ())
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after" in trailers:
        line += f" (retry after {trailers['retry-after']} s)"
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        line += " (run `aiwfe login`)"
    return line


def _connector(args: argparse.Namespace) -> Connect:
    """A `connect()` for the gateway with the stored tokens; loads the client on call."""

    def connect() -> AbstractAsyncContextManager[AsyncClient]:
        from aiwfe.sdk.client import AsyncClient, CredentialStore

        store = CredentialStore(args.credentials)
        tokens = store.load(args.gateway)
        args.logged_in = tokens is not None
        args.store_path = store.path
        return AsyncClient(
            args.gateway,
            tls=args.tls,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            tokens=tokens,
            timeout=args.timeout or DEFAULT_TIMEOUT,
            on_tokens=lambda new: store.save(args.gateway, new),
        )

    return connect


# --- local commands -------------------------------------------------------------------------


def _up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration file (default: $AIWFE_CONFIG)")


@command("up", "start all four services on this machine", _up_args, api=False)
def _up(args: argparse.Namespace) -> int:
    from aiwfe.app.launcher import up

    return up(args.config)


def _models_pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration file (default: $AIWFE_CONFIG)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="catalogue model to fetch (repeatable; default: the configured onnx backends)",
    )
    p.add_argument("--mirror", help="base URL serving the files (default: the catalogue's)")


@command(
    "models pull", "download the configured onnx models (resumable)", _models_pull_args, api=False
)
def _models_pull(args: argparse.Namespace) -> int:
    from cognitive import models_command

    return models_command.run(args)


@command(
    "serve",
    "run one service in the foreground",
    lambda p: p.add_argument("service", choices=SERVICES),
    api=False,
)
def _serve(args: argparse.Namespace) -> int:
    import importlib

    importlib.import_module(f"{args.service}.__main__")
    return 0


def _health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", nargs="?", help="host:port (default: --gateway)")
    p.add_argument("--service", default="", help="full service name (default: server)")


@command("health", "grpc.health.v1 check; exit 0 when SERVING", _health_args, api=False)
def _health(args: argparse.Namespace) -> int:
    import grpc

    from aiwfe.sdk.channel import channel_credentials

    address = args.address or args.gateway
    creds = None
    if args.tls or args.ca_file or args.cert_file:
        creds = channel_credentials(args.ca_file, args.cert_file, args.key_file)

    async def probe() -> int:
        status = await check_health(address, args.service, args.timeout or HEALTH_TIMEOUT, creds)
        print(status)
        return 0 if status == "SERVING" else 1

    try:
        return asyncio.run(probe())
    except grpc.aio.AioRpcError as exc:
        print(
            f"{address}: {exc.code().name}: {' '.join((exc.details() or '').split())}",
            file=sys.stderr,
        )
        return EXIT_RPC_ERROR


@command(
    "bench",
    "run the benchmark harness (python -m benchmarks)",
    lambda p: p.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks"
    ),
    api=False,
)
def _bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").exists():
        print(
            "aiwfe: bench needs a source checkout (benchmarks/ is not installed)", file=sys.stderr
        )
        return EXIT_USAGE
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.args], cwd=root)


def _worker_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("module", help="package.module whose @task functions to serve")
    p.add_argument(
        "--queue", action="append", default=[], help="queue to poll (repeatable; default: default)"
    )
    p.add_argument("--concurrency", type=int, default=16, help="tasks at once (default 16)")
    p.add_argument(
        "--api-key-env",
        default="AIWFE_API_KEY",
        help="environment variable holding the API key (default AIWFE_API_KEY)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds running tasks get to finish on SIGTERM (default 10)",
    )


@command(
    "worker run",
    "serve a module's @task functions as workflow steps (op: task)",
    _worker_run_args,
    api=False,
)
def _worker_run(args: argparse.Namespace) -> int:
    import importlib
    import logging

    from aiwfe.sdk.worker import Worker, WorkerError, tasks_in_module

    api_key = os.environ.get(args.api_key_env, "")
    if not api_key:
        raise UsageError(
            f"no API key: set ${args.api_key_env} (`aiwfe api-key create NAME` prints one)"
        )
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, not {args.concurrency}")
    sys.path.insert(0, os.getcwd())  # `aiwfe worker run mytasks` finds ./mytasks.py
    try:
        module = importlib.import_module(args.module)
    except ImportError as exc:
        raise UsageError(f"cannot import {args.module}: {exc}") from None
    tasks = tasks_in_module(module)
    if not tasks:
        raise UsageError(f"{args.module} has no @task functions")
    try:
        worker = Worker(
            args.gateway,
            api_key,
            queues=args.queue or ["default"],
            tasks=tasks,
            concurrency=args.concurrency,
            shutdown_grace=args.shutdown_grace,
            tls=args.tls,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            call_timeout=args.timeout or DEFAULT_TIMEOUT,
        )
    except ValueError as exc:  # a queue or task name the contract refuses
        raise UsageError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        worker.run()
    except WorkerError as exc:
        print(f"aiwfe: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR
    return 0


# --- session --------------------------------------------------------------------------------


def _login_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-u", "--username", default=os.environ.get("AIWFE_USERNAME", "admin"))
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")


@command("login", "log in and store the tokens (0600)", _login_args)
async def _login(args: argparse.Namespace, connect: Connect) -> int:
    password = _password(args.password_stdin, f"password for {args.username}: ")
    async with connect() as client:
        reply = await client.login(args.username, password)
    _emit(
        args,
        reply,
        lambda: (
            f"logged in to {args.gateway} as {args.username}"
            f" (token valid {reply.expires_in} s; saved to {args.store_path})"
        ),
    )
    return 0


@command("logout", "revoke the session and forget the tokens")
async def _logout(args: argparse.Namespace, connect: Connect) -> int:
    from aiwfe.sdk.client import CredentialStore

    async with connect() as client:
        try:
            await client.logout()
        finally:
            CredentialStore(args.credentials).save(args.gateway, None)
    if not args.json:
        print(f"logged out of {args.gateway}")
    return 0


@command("whoami", "the logged-in principal")
async def _whoami(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        who = await client.whoami()
    _emit(
        args,
        who,
        lambda: (
            f"{who.username} ({who.user_id})\nroles: {', '.join(who.roles)}\n"
            f"permissions: {', '.join(who.permissions)}"
        ),
    )
    return 0


# --- cognitive ------------------------------------------------------------------------------


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--model", default="")
    p.add_argument("--bypass-cache", action="store_true")


@command("embed", "embed texts", _embed_args)
async def _embed(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        emb = await client.embed(args.texts, args.model, args.bypass_cache)

    def human() -> str:
        lines = [
            f"{len(emb.embeddings)} embeddings, dimension {emb.dimension}, "
            f"model {emb.model}, {emb.cached_count} from cache"
        ]
        for text, vec in zip(args.texts, emb.embeddings, strict=False):
            head = ", ".join(f"{v:.4f}" for v in vec.values[:4])
            lines.append(f"  {text[:40]!r}: [{head}, ...]")
        return "\n".join(lines)

    _emit(args, emb, human)
    return 0


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", type=Path)
    p.add_argument("--collection", required=True)
    p.add_argument("--model", default="")
    p.add_argument(
        "--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata (repeatable)"
    )


@command("index", "index text files into a collection", _index_args)
async def _index(args: argparse.Namespace, connect: Connect) -> int:
    from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb

    meta = _pairs(args.meta, "--meta")
    documents = [
        cog_pb.Document(id=path.name, text=_read_text(path), metadata={**meta, "path": str(path)})
        for path in args.files
    ]
    total = cog_pb.IndexDocumentsResponse()
    async with connect() as client:
        for i in range(0, len(documents), INDEX_BATCH):
            part = await client.index_documents(
                args.collection, documents[i : i + INDEX_BATCH], args.model
            )
            total.document_count += part.document_count
            total.chunk_count += part.chunk_count
    _emit(
        args,
        total,
        lambda: (
            f"indexed {total.document_count} documents "
            f"({total.chunk_count} chunks) into {args.collection}"
        ),
    )
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query")
    p.add_argument("--collection", required=True)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threshold", type=float, default=0.0, help="minimum score")
    p.add_argument("--model", default="", help="the backend the collection was indexed with")


@command("search", "semantic search in a collection", _search_args)
async def _search(args: argparse.Namespace, connect: Connect) -> int:
    filters = _pairs(args.filter, "--filter")
    async with connect() as client:
        found = await client.search(
            args.collection, args.query, args.top_k, filters, args.threshold, args.model
        )
    _emit(
        args,
        found,
        lambda: (
            "\n".join(
                f"{h.score:.3f}  {h.document_id}  {' '.join(h.text.split())[:100]}"
                for h in found.hits
            )
            or "no hits"
        ),
    )
    return 0


def _classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text")
    p.add_argument(
        "-l", "--label", action="append", default=[], dest="labels", help="label (repeat >= 2)"
    )
    p.add_argument("--example", action="append", default=[], metavar="LABEL=TEXT")


@command("classify", "rank labels for a text", _classify_args)
async def _classify(args: argparse.Namespace, connect: Connect) -> int:
    from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb

    if len(args.labels) < 2:
        raise UsageError("classify needs at least two --label")
    examples = [
        cog_pb.LabelExample(label=k, text=v) for k, v in _pairs(args.example, "--example").items()
    ]
    async with connect() as client:
        ranked = await client.classify(args.text, args.labels, examples)
    _emit(args, ranked, lambda: "\n".join(f"{s.score:.3f}  {s.label}" for s in ranked.labels))
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--model", default="")
    p.add_argument("--system", default="")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--collection", default="", help="ground on hits from this collection")
    p.add_argument("--top-k", type=int, default=0)


@command("generate", "stream a completion", _generate_args)
async def _generate(args: argparse.Namespace, connect: Connect) -> int:
    from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb

    request = cog_pb.GenerateRequest(
        prompt=args.prompt,
        model=args.model,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        context_collection=args.collection,
        context_top_k=args.top_k,
    )
    async with connect() as client:
        async for piece in client.generate(request):
            if args.json:
                print(json.dumps(_as_dict(piece)), flush=True)
            else:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
    if not args.json:
        print()
    return 0


# --- collections ----------------------------------------------------------------------------


@command("collections ls", "your collections and those shared with you")
async def _collections_ls(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        listed = await client.list_collections()
    _emit(
        args,
        listed,
        lambda: "\n".join(_collection_line(c) for c in listed.collections) or "no collections",
    )
    return 0


def _grant_args(write: bool) -> Configure:
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("collection", metavar="NAME")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--user", default="", help="username of the grantee")
        who.add_argument("--role", default="", help="role of the grantees")
        if write:
            p.add_argument("--write", action="store_true", help="let them index into it too")

    return configure


@command(
    "collections share",
    "grant a user or a role access (read; --write to index too)",
    _grant_args(write=True),
)
async def _collections_share(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        shared = await client.share_collection(
            args.collection, username=args.user, role=args.role, write=args.write
        )
    _emit(args, shared, lambda: _collection_line(shared.collection))
    return 0


@command("collections unshare", "remove a user's or a role's access", _grant_args(write=False))
async def _collections_unshare(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        unshared = await client.unshare_collection(
            args.collection, username=args.user, role=args.role
        )
    _emit(args, unshared, lambda: _collection_line(unshared.collection))
    return 0


@command(
    "collections rm",
    "delete a collection you own",
    lambda p: p.add_argument("collection", metavar="NAME"),
)
async def _collections_rm(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        deleted = await client.delete_collection(args.collection)
    _emit(args, deleted, lambda: f"deleted collection {args.collection}")
    return 0


# --- workflows ------------------------------------------------------------------------------


async def _follow(args: argparse.Namespace, events: AsyncIterator[Any]) -> int:
    """Prints workflow events to the end; exit status 0 only if it succeeded."""
    from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb

    terminal = wf_pb.WORKFLOW_STATE_PENDING
    async for event in events:
        terminal = event.workflow_state
        if args.json:
            print(json.dumps(_as_dict(event)), flush=True)
            continue
        state = _enum(wf_pb.WorkflowState, event.workflow_state, "WORKFLOW_STATE_")
        if event.step_name:
            step = _enum(wf_pb.StepState, event.step_state, "STEP_STATE_")
            text = f"step {event.step_name}: {step}"
        else:
            text = f"workflow: {state}"
        message = f" - {event.message}" if event.message else ""
        print(f"[{_time(event.event_time)}] {text}{message}", flush=True)
    return 0 if terminal == wf_pb.WORKFLOW_STATE_SUCCEEDED else 1


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path)
    p.add_argument("--watch", action="store_true", help="follow progress until terminal")
    p.add_argument("--idempotency-key", default="")


@command("workflow submit", "submit a YAML/JSON WorkflowSpec", _submit_args)
async def _workflow_submit(args: argparse.Namespace, connect: Connect) -> int:
    spec = load_workflow_spec(args.file)
    async with connect() as client:
        if args.watch:  # one call: the workflow first, then its events
            updates = client.run_workflow(spec, args.idempotency_key)
            submitted = (await anext(updates)).workflow
            _emit(args, submitted, lambda: _workflow_lines(submitted))
            return await _follow(args, (u.event async for u in updates))
        submitted = (await client.submit_workflow(spec, args.idempotency_key)).workflow
    _emit(args, submitted, lambda: _workflow_lines(submitted))
    return 0


def _workflow_ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default="", help="e.g. RUNNING, SUCCEEDED")
    p.add_argument("--name", default="", help="the spec's name (exact)")
    p.add_argument("--schedule", default="", help="started by this schedule (its id)")
    p.add_argument("--since", default="", help="created at or after: ISO time, or 30m/12h/7d ago")
    p.add_argument("--until", default="", help="created before: ISO time, or 30m/12h/7d ago")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")


_AGO_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(option: str, text: str) -> datetime | None:
    """`--since`/`--until`: an ISO 8601 time (UTC when it names no offset) or a duration
    ago (`90s`, `30m`, `12h`, `7d`); empty is None."""
    if not text:
        return None
    unit = _AGO_UNITS.get(text[-1:])
    if unit is not None and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * unit)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option} expects an ISO time or a duration ago like 30m, got {text!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@command(
    "workflow ls", "list your workflows (filters: state, name, schedule, time)", _workflow_ls_args
)
async def _workflow_ls(args: argparse.Namespace, connect: Connect) -> int:
    from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb

    state = wf_pb.WORKFLOW_STATE_UNSPECIFIED
    if args.state:
        name = "WORKFLOW_STATE_" + args.state.upper().removeprefix("WORKFLOW_STATE_")
        if name not in wf_pb.WorkflowState.keys():
            raise UsageError(f"unknown --state {args.state!r}")
        state = wf_pb.WorkflowState.Value(name)
    since, until = parse_when("--since", args.since), parse_when("--until", args.until)
    async with connect() as client:
        page = await client.list_workflows(
            state,
            args.page_size,
            args.page_token,
            name=args.name,
            schedule_id=args.schedule,
            create_after=since,
            create_before=until,
        )
    _emit(
        args,
        page,
        lambda: (
            "\n".join(
                [_workflow_lines(w).splitlines()[0] for w in page.workflows]
                + _next_page(page.next_page_token)
            )
            or "no workflows"
        ),
    )
    return 0


def _workflow_id_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow_id")


@command("workflow get", "show one workflow", _workflow_id_arg)
async def _workflow_get(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        got = (await client.get_workflow(args.workflow_id)).workflow
    _emit(args, got, lambda: _workflow_lines(got))
    return 0


@command("workflow cancel", "cancel a workflow", _workflow_id_arg)
async def _workflow_cancel(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        cancelled = (await client.cancel_workflow(args.workflow_id)).workflow
    _emit(args, cancelled, lambda: _workflow_lines(cancelled))
    return 0


@command("workflow retry", "re-run a failed, cancelled or timed-out workflow", _workflow_id_arg)
async def _workflow_retry(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        retried = (await client.retry_workflow(args.workflow_id)).workflow
    _emit(args, retried, lambda: _workflow_lines(retried))
    return 0


def _workflow_signal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow_id")
    p.add_argument("name", help="the signal a wait_for_signal step waits for")
    p.add_argument("--data", default="{}", help="the payload, a JSON object")
    p.add_argument("--signal-id", default="", help="resending with the same id is a no-op")


@command("workflow signal", "send a signal to a workflow", _workflow_signal_args)
async def _workflow_signal(args: argparse.Namespace, connect: Connect) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--data is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("--data must be a JSON object")
    async with connect() as client:
        sent = await client.signal_workflow(args.workflow_id, args.name, data, args.signal_id)
    state = "duplicate" if sent.duplicate else "delivered" if sent.delivered else "kept"
    _emit(args, sent, lambda: f"signal {args.name}: {state}")
    return 0


@command("workflow watch", "follow a workflow until terminal", _workflow_id_arg)
async def _workflow_watch(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        return await _follow(args, client.watch_workflow(args.workflow_id))


# --- schedules ------------------------------------------------------------------------------

_OVERLAP = {"skip": "SKIP", "buffer-one": "BUFFER_ONE", "allow-all": "ALLOW_ALL"}
_CATCH_UP = {"skip-missed": "SKIP_MISSED", "latest": "LATEST", "all": "ALL"}


def _schedule_line(s: Any) -> str:
    from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb

    overlap = _enum(sched_pb.OverlapPolicy, s.overlap_policy, "OVERLAP_POLICY_")
    catch_up = _enum(sched_pb.CatchUpPolicy, s.catch_up_policy, "CATCH_UP_POLICY_")
    return (
        f"{s.schedule_id}  {s.name}  '{s.cron}' {s.time_zone or 'UTC'}"
        f"  {'paused' if s.paused else 'active'}  overlap {overlap.lower()}"
        f"  catch-up {catch_up.lower()}  next {_time(s.next_tick_time)}"
        f"  last {_time(s.last_tick_time)} {s.last_workflow_id or '-'}"
    )


def _schedule_create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--cron", required=True, help="5 fields, or 6 with seconds first")
    p.add_argument("--tz", default="", help="IANA time zone, e.g. Europe/Paris (default UTC)")
    p.add_argument("--file", type=Path, required=True, help="the YAML/JSON WorkflowSpec")
    p.add_argument("--overlap", choices=sorted(_OVERLAP), default="skip")
    p.add_argument("--catch-up", choices=sorted(_CATCH_UP), default="skip-missed")
    p.add_argument("--paused", action="store_true", help="create it paused")


@command("schedule create", "submit a workflow on a cron schedule", _schedule_create_args)
async def _schedule_create(args: argparse.Namespace, connect: Connect) -> int:
    from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb

    request = sched_pb.CreateScheduleRequest(
        name=args.name,
        cron=args.cron,
        time_zone=args.tz,
        spec=load_workflow_spec(args.file),
        overlap_policy=sched_pb.OverlapPolicy.Value("OVERLAP_POLICY_" + _OVERLAP[args.overlap]),
        catch_up_policy=sched_pb.CatchUpPolicy.Value("CATCH_UP_POLICY_" + _CATCH_UP[args.catch_up]),
        paused=args.paused,
    )
    async with connect() as client:
        created = (await client.create_schedule(request)).schedule
    _emit(args, created, lambda: _schedule_line(created))
    return 0


def _schedule_ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")


@command("schedule ls", "list your schedules", _schedule_ls_args)
async def _schedule_ls(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        page = await client.list_schedules(args.page_size, args.page_token)
    _emit(
        args,
        page,
        lambda: (
            "\n".join(
                [_schedule_line(s) for s in page.schedules] + _next_page(page.next_page_token)
            )
            or "no schedules"
        ),
    )
    return 0


def _schedule_id_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("schedule_id")


@command("schedule get", "show one schedule", _schedule_id_arg)
async def _schedule_get(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        got = (await client.get_schedule(args.schedule_id)).schedule
    _emit(args, got, lambda: _schedule_line(got))
    return 0


@command("schedule pause", "pause a schedule", _schedule_id_arg)
async def _schedule_pause(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        paused = (await client.pause_schedule(args.schedule_id, True)).schedule
    _emit(args, paused, lambda: _schedule_line(paused))
    return 0


@command("schedule resume", "resume a paused schedule (missed ticks are not run)", _schedule_id_arg)
async def _schedule_resume(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        resumed = (await client.pause_schedule(args.schedule_id, False)).schedule
    _emit(args, resumed, lambda: _schedule_line(resumed))
    return 0


@command("schedule delete", "delete a schedule (its workflows keep running)", _schedule_id_arg)
async def _schedule_delete(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        deleted = (await client.delete_schedule(args.schedule_id)).schedule
    _emit(args, deleted, lambda: f"deleted schedule {deleted.schedule_id} ({deleted.name})")
    return 0


@command("schedule trigger", "submit a schedule's workflow now", _schedule_id_arg)
async def _schedule_trigger(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        reply = await client.trigger_schedule(args.schedule_id)
    _emit(args, reply, lambda: _workflow_lines(reply.workflow))
    return 0


# --- administration -------------------------------------------------------------------------


def _users_create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("username")
    p.add_argument("--role", action="append", default=[], dest="roles")
    p.add_argument("--password-stdin", action="store_true")


@command("users create", "create an account", _users_create_args)
async def _users_create(args: argparse.Namespace, connect: Connect) -> int:
    password = _password(args.password_stdin, f"password for new user {args.username}: ")
    async with connect() as client:
        made = await client.create_user(args.username, password, args.roles)
    _emit(args, made, lambda: _user_line(made.user))
    return 0


def _users_ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")


@command("users ls", "list accounts", _users_ls_args)
async def _users_ls(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        users = await client.list_users(args.page_size, args.page_token)
    _emit(
        args,
        users,
        lambda: "\n".join([_user_line(u) for u in users.users] + _next_page(users.next_page_token)),
    )
    return 0


def _set_roles_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("username")
    p.add_argument("roles", nargs="+")


@command("users set-roles", "replace an account's roles", _set_roles_args)
async def _users_set_roles(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        changed = await client.set_user_roles(args.username, args.roles)
    _emit(args, changed, lambda: _user_line(changed.user))
    return 0


@command("users disable", "disable an account", lambda p: p.add_argument("username"))
async def _users_disable(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        off = await client.disable_user(args.username)
    _emit(args, off, lambda: _user_line(off.user))
    return 0


# --- service accounts and API keys -----------------------------------------------------------

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """Seconds of a lifetime like `30d`, `12h`, `90m`, `45s` or `3600` (argparse's type: a
    bad one is a usage error, exit 2)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _TTL_UNITS else (text, "s")
    try:
        seconds = float(number) * _TTL_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expects a lifetime like 30d, 12h, 90m or 3600, got {text!r}"
        ) from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return seconds


def _key_line(key: Any) -> str:
    state = "revoked" if key.revoked else "active"
    expires = _time(key.expire_time) if key.HasField("expire_time") else "never"
    used = _time(key.last_used_time)
    return (
        f"{key.key_id:<17} {key.name or '-':<16} {state:<8} created {_time(key.create_time)}"
        f"  expires {expires}  last used {used}"
    )


def _service_account_create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--role", action="append", default=[], dest="roles", required=True)


@command(
    "service-account create", "create a service account (no password)", _service_account_create_args
)
async def _service_account_create(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        made = await client.create_service_account(args.name, args.roles)
    _emit(args, made, lambda: _user_line(made.service_account))
    return 0


@command("service-account ls", "list service accounts", _users_ls_args)
async def _service_account_ls(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        listed = await client.list_service_accounts(args.page_size, args.page_token)
    lines = [_user_line(a) for a in listed.service_accounts]
    _emit(args, listed, lambda: "\n".join(lines + _next_page(listed.next_page_token)))
    return 0


@command(
    "service-account set-roles",
    "replace a service account's roles (its keys get them within a second)",
    _set_roles_args,
)
async def _service_account_set_roles(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        changed = await client.set_user_roles(args.username, args.roles)
    _emit(args, changed, lambda: _user_line(changed.user))
    return 0


@command(
    "service-account disable",
    "disable a service account: every key it holds stops working",
    lambda p: p.add_argument("username"),
)
async def _service_account_disable(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        off = await client.disable_user(args.username)
    _emit(args, off, lambda: _user_line(off.user))
    return 0


def _api_key_create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("account", help="the service account's name")
    p.add_argument("--name", default="", help="a label: what runs with the key")
    p.add_argument("--ttl", type=parse_ttl, default=None, help="lifetime, e.g. 30d (default: none)")


@command("api-key create", "issue an API key (printed once)", _api_key_create_args)
async def _api_key_create(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        made = await client.create_api_key(args.account, args.name, args.ttl)
    if not args.json:
        print(f"API key {made.api_key.key_id} for {args.account}: shown only now", file=sys.stderr)
    _emit(args, made, lambda: made.key)
    return 0


def _api_key_ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("account", help="the service account's name")
    _users_ls_args(p)


@command("api-key ls", "list a service account's API keys (never the keys)", _api_key_ls_args)
async def _api_key_ls(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        listed = await client.list_api_keys(args.account, args.page_size, args.page_token)
    lines = [_key_line(k) for k in listed.api_keys]
    _emit(args, listed, lambda: "\n".join(lines + _next_page(listed.next_page_token)))
    return 0


@command(
    "api-key revoke",
    "revoke an API key on every gateway replica",
    lambda p: p.add_argument("key_id"),
)
async def _api_key_revoke(args: argparse.Namespace, connect: Connect) -> int:
    async with connect() as client:
        revoked = await client.revoke_api_key(args.key_id)
    _emit(args, revoked, lambda: _key_line(revoked.api_key))
    return 0


@command("breakers", "every service's circuit breakers (admin)")
async def _breakers(args: argparse.Namespace, connect: Connect) -> int:
    from aiwfe.system.v1 import system_service_pb2 as sys_pb

    async with connect() as client:
        listed = await client.list_circuit_breakers()

    def human() -> str:
        lines = [
            f"{b.service:<14} -> {b.downstream:<14} "
            f"{_enum(sys_pb.BreakerState, b.state, 'BREAKER_STATE_'):<10} "
            f"failures {b.failure_count}"
            + (f", open {b.open_remaining_seconds:.0f} s" if b.open_remaining_seconds else "")
            for b in listed.breakers
        ]
        lines += [f"unreachable: {name}" for name in listed.unreachable_services]
        return "\n".join(lines) or "no breakers"

    _emit(args, listed, human)
    return 0


# --- running --------------------------------------------------------------------------------


async def run_api_command(args: argparse.Namespace) -> int:
    """Runs one API command through the gateway; returns the exit code."""
    args.logged_in = True
    try:
        return int(await args.handler(args, _connector(args)))
    except Exception as exc:
        import grpc  # loaded by then if the call failed: not before a password prompt

        unauthenticated = (
            isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED
        )
        if unauthenticated and not args.logged_in:
            raise NotLoggedIn(
                f"not logged in to {args.gateway} \N{EM DASH} run `aiwfe login`"
            ) from None
        raise


def _run(args: argparse.Namespace) -> int:
    """Runs the parsed command; errors become one line on stderr and an exit code."""
    try:
        if args.api:
            return asyncio.run(run_api_command(args))
        return int(args.handler(args))
    except UsageError as exc:
        print(f"aiwfe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NotLoggedIn as exc:
        print(f"aiwfe: UNAUTHENTICATED: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Loaded only if a command got that far: a failure raised by them was imported.
        import grpc

        from aiwfe.runtime.config import ConfigError

        if isinstance(exc, grpc.aio.AioRpcError):
            print(rpc_error_line(exc), file=sys.stderr)
            return EXIT_RPC_ERROR
        if isinstance(exc, ConfigError):
            print(f"aiwfe: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(_run(build_parser().parse_args(argv)))


if __name__ == "__main__":  # pragma: no cover
    main()
