"""The `aiwfe` command: run the suite (`up`), one service (`serve`), probe health, and drive
the API through the gateway (login, embed, search, workflows, users, ...).

Human output by default, `--json` for scripts. A gRPC error becomes one line on stderr
(`aiwfe: CODE: details`) and exit code 1; bad usage or unreadable input exits 2.
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
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiwfe.config import ConfigError

SERVICES = ("gateway", "cognitive", "taskproc", "dataplatform")
# Bounds on what the CLI reads and sends per call (the server enforces its own too).
MAX_FILE_BYTES = 8 * 1024 * 1024
INDEX_BATCH = 64
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or its input files (exit code 2)."""


async def check_health(
    address: str,
    service: str,
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> str:
    """The grpc.health.v1 status name of `service` at `address` (TLS with credentials)."""
    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _serve(name: str) -> None:
    import importlib

    importlib.import_module(f"{name}.__main__")


# --- argument parsing ---------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--gateway",
        default=os.environ.get("AIWFE_GATEWAY", "127.0.0.1:50051"),
        help="gateway host:port (default: $AIWFE_GATEWAY or 127.0.0.1:50051)",
    )
    common.add_argument("--tls", action="store_true", help="connect with TLS")
    common.add_argument("--ca-file", help="PEM CA to verify the server (implies --tls)")
    common.add_argument("--cert-file", help="PEM client certificate for mTLS (implies --tls)")
    common.add_argument("--key-file", help="PEM key of --cert-file")
    common.add_argument("--timeout", type=float, default=30.0, help="deadline per call (s)")
    return common


def _api_options() -> argparse.ArgumentParser:
    api = argparse.ArgumentParser(add_help=False, parents=[_connection_options()])
    api.add_argument("--json", action="store_true", help="machine-readable JSON output")
    api.add_argument(
        "--credentials",
        help="token file (default: $AIWFE_CREDENTIALS or ~/.config/aiwfe/credentials.json)",
    )
    return api


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiwfe", description="AI Workflow Engine")
    sub = parser.add_subparsers(dest="command", required=True)
    api = _api_options()

    p = sub.add_parser("up", help="start all four services on this machine")
    p.add_argument("--config", help="YAML configuration file (default: $AIWFE_CONFIG)")
    p = sub.add_parser("serve", help="run one service in the foreground")
    p.add_argument("service", choices=SERVICES)
    p = sub.add_parser(
        "health", help="grpc.health.v1 check; exit 0 when SERVING", parents=[_connection_options()]
    )
    p.add_argument("address", nargs="?", help="host:port (default: --gateway)")
    p.add_argument("--service", default="", help="full service name (default: server)")
    p.set_defaults(timeout=3.0)

    p = sub.add_parser("login", help="log in and store the tokens (0600)", parents=[api])
    p.add_argument("-u", "--username", default=os.environ.get("AIWFE_USERNAME", "admin"))
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sub.add_parser("logout", help="revoke the session and forget the tokens", parents=[api])
    sub.add_parser("whoami", help="the logged-in principal", parents=[api])

    p = sub.add_parser("embed", help="embed texts", parents=[api])
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--model", default="")
    p.add_argument("--bypass-cache", action="store_true")

    p = sub.add_parser("index", help="index text files into a collection", parents=[api])
    p.add_argument("files", nargs="+", metavar="FILE", type=Path)
    p.add_argument("--collection", required=True)
    p.add_argument("--model", default="")
    p.add_argument(
        "--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata (repeatable)"
    )

    p = sub.add_parser("search", help="semantic search in a collection", parents=[api])
    p.add_argument("query")
    p.add_argument("--collection", required=True)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threshold", type=float, default=0.0, help="minimum score")

    p = sub.add_parser("classify", help="rank labels for a text", parents=[api])
    p.add_argument("text")
    p.add_argument(
        "-l", "--label", action="append", default=[], dest="labels", help="label (repeat >= 2)"
    )
    p.add_argument("--example", action="append", default=[], metavar="LABEL=TEXT")

    p = sub.add_parser("generate", help="stream a completion", parents=[api])
    p.add_argument("prompt")
    p.add_argument("--model", default="")
    p.add_argument("--system", default="")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--collection", default="", help="ground on hits from this collection")
    p.add_argument("--top-k", type=int, default=0)

    p = sub.add_parser("collections", help="list, share and delete collections")
    co = p.add_subparsers(dest="collections_command", required=True)
    co.add_parser("ls", help="your collections and those shared with you", parents=[api])
    for name, text in (
        ("share", "grant a user or a role access (read; --write to index too)"),
        ("unshare", "remove a user's or a role's access"),
    ):
        c = co.add_parser(name, help=text, parents=[api])
        c.add_argument("collection", metavar="NAME")
        who = c.add_mutually_exclusive_group(required=True)
        who.add_argument("--user", default="", help="username of the grantee")
        who.add_argument("--role", default="", help="role of the grantees")
        if name == "share":
            c.add_argument("--write", action="store_true", help="let them index into it too")
    c = co.add_parser("rm", help="delete a collection you own", parents=[api])
    c.add_argument("collection", metavar="NAME")

    p = sub.add_parser("workflow", help="submit and manage workflows")
    wf = p.add_subparsers(dest="workflow_command", required=True)
    w = wf.add_parser("submit", help="submit a YAML/JSON WorkflowSpec", parents=[api])
    w.add_argument("file", type=Path)
    w.add_argument("--watch", action="store_true", help="follow progress until terminal")
    w.add_argument("--idempotency-key", default="")
    w = wf.add_parser("ls", help="list your workflows", parents=[api])
    w.add_argument("--state", default="", help="e.g. RUNNING, SUCCEEDED")
    w.add_argument("--page-size", type=int, default=0)
    w.add_argument("--page-token", default="")
    for name, text in (("get", "show one workflow"), ("cancel", "cancel a workflow")):
        w = wf.add_parser(name, help=text, parents=[api])
        w.add_argument("workflow_id")
    w = wf.add_parser("watch", help="follow a workflow until terminal", parents=[api])
    w.add_argument("workflow_id")

    p = sub.add_parser("users", help="manage accounts (admin)")
    us = p.add_subparsers(dest="users_command", required=True)
    u = us.add_parser("create", help="create an account", parents=[api])
    u.add_argument("username")
    u.add_argument("--role", action="append", default=[], dest="roles")
    u.add_argument("--password-stdin", action="store_true")
    u = us.add_parser("ls", help="list accounts", parents=[api])
    u.add_argument("--page-size", type=int, default=0)
    u.add_argument("--page-token", default="")
    u = us.add_parser("set-roles", help="replace an account's roles", parents=[api])
    u.add_argument("username")
    u.add_argument("roles", nargs="+")
    u = us.add_parser("disable", help="disable an account", parents=[api])
    u.add_argument("username")

    sub.add_parser("breakers", help="every service's circuit breakers (admin)", parents=[api])

    from cognitive import models_command  # `aiwfe models pull` lives with the model store

    models_command.add_parser(sub)

    p = sub.add_parser("bench", help="run the benchmark harness (python -m benchmarks)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
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
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _emit(args: argparse.Namespace, message: Message, human: Callable[[], str]) -> None:
    print(json.dumps(_as_dict(message)) if args.json else human())


def _enum(message_enum: Any, value: int, prefix: str) -> str:
    return message_enum.Name(value).removeprefix(prefix)


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


def rpc_error_line(exc: grpc.aio.AioRpcError) -> str:
    """One line for a gRPC failure: code, details, and a hint where one helps."""
    details = " ".join((exc.details() or "").split())
    line = f"aiwfe: {exc.code().name}: {details}"
    trailers = dict(exc.trailing_metadata() or ())
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after" in trailers:
        line += f" (retry after {trailers['retry-after']} s)"
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        line += " (run `aiwfe login`)"
    return line


# --- commands -------------------------------------------------------------------------------


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


async def run_api_command(args: argparse.Namespace) -> int:
    """Runs one API command through the gateway; returns the exit code."""
    from aiwfe.client import AsyncClient, CredentialStore
    from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
    from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb

    store = CredentialStore(args.credentials)
    command = args.command
    # Validate every input before connecting, so usage errors never depend on the server.
    spec = None
    if command == "workflow" and args.workflow_command == "submit":
        spec = load_workflow_spec(args.file)
    if command == "classify" and len(args.labels) < 2:
        raise UsageError("classify needs at least two --label")
    documents: list[Any] = []
    if command == "index":
        meta = _pairs(args.meta, "--meta")
        for path in args.files:
            documents.append(
                cog_pb.Document(
                    id=path.name, text=_read_text(path), metadata={**meta, "path": str(path)}
                )
            )
    state = wf_pb.WORKFLOW_STATE_UNSPECIFIED
    if command == "workflow" and args.workflow_command == "ls" and args.state:
        name = "WORKFLOW_STATE_" + args.state.upper().removeprefix("WORKFLOW_STATE_")
        if name not in wf_pb.WorkflowState.keys():
            raise UsageError(f"unknown --state {args.state!r}")
        state = wf_pb.WorkflowState.Value(name)
    password = None
    if command == "login":
        password = _password(args.password_stdin, f"password for {args.username}: ")
    if command == "users" and args.users_command == "create":
        password = _password(args.password_stdin, f"password for new user {args.username}: ")

    async with AsyncClient(
        args.gateway,
        tls=args.tls,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        tokens=store.load(args.gateway),
        timeout=args.timeout,
        on_tokens=lambda tokens: store.save(args.gateway, tokens),
    ) as client:
        if command == "login":
            reply = await client.login(args.username, password or "")
            _emit(
                args,
                reply,
                lambda: (
                    f"logged in to {args.gateway} as {args.username}"
                    f" (token valid {reply.expires_in} s; saved to {store.path})"
                ),
            )
        elif command == "logout":
            try:
                await client.logout()
            finally:
                store.save(args.gateway, None)
            if not args.json:
                print(f"logged out of {args.gateway}")
        elif command == "whoami":
            who = await client.whoami()
            _emit(
                args,
                who,
                lambda: (
                    f"{who.username} ({who.user_id})\nroles: {', '.join(who.roles)}\n"
                    f"permissions: {', '.join(who.permissions)}"
                ),
            )
        elif command == "embed":
            emb = await client.embed(args.texts, args.model, args.bypass_cache)

            def human_embed() -> str:
                lines = [
                    f"{len(emb.embeddings)} embeddings, dimension {emb.dimension}, "
                    f"model {emb.model}, {emb.cached_count} from cache"
                ]
                for text, vec in zip(args.texts, emb.embeddings, strict=False):
                    head = ", ".join(f"{v:.4f}" for v in vec.values[:4])
                    lines.append(f"  {text[:40]!r}: [{head}, ...]")
                return "\n".join(lines)

            _emit(args, emb, human_embed)
        elif command == "index":
            total = cog_pb.IndexDocumentsResponse()
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
        elif command == "search":
            found = await client.search(
                args.collection,
                args.query,
                args.top_k,
                _pairs(args.filter, "--filter"),
                args.threshold,
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
        elif command == "classify":
            examples = [
                cog_pb.LabelExample(label=k, text=v)
                for k, v in _pairs(args.example, "--example").items()
            ]
            ranked = await client.classify(args.text, args.labels, examples)
            _emit(
                args,
                ranked,
                lambda: "\n".join(f"{s.score:.3f}  {s.label}" for s in ranked.labels),
            )
        elif command == "generate":
            request = cog_pb.GenerateRequest(
                prompt=args.prompt,
                model=args.model,
                system=args.system,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                context_collection=args.collection,
                context_top_k=args.top_k,
            )
            async for piece in client.generate(request):
                if args.json:
                    print(json.dumps(_as_dict(piece)), flush=True)
                else:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
            if not args.json:
                print()
        elif command == "collections":
            sub = args.collections_command
            if sub == "ls":
                listed_collections = await client.list_collections()
                _emit(
                    args,
                    listed_collections,
                    lambda: (
                        "\n".join(_collection_line(c) for c in listed_collections.collections)
                        or "no collections"
                    ),
                )
            elif sub == "share":
                shared = await client.share_collection(
                    args.collection, username=args.user, role=args.role, write=args.write
                )
                _emit(args, shared, lambda: _collection_line(shared.collection))
            elif sub == "unshare":
                unshared = await client.unshare_collection(
                    args.collection, username=args.user, role=args.role
                )
                _emit(args, unshared, lambda: _collection_line(unshared.collection))
            else:
                deleted = await client.delete_collection(args.collection)
                _emit(args, deleted, lambda: f"deleted collection {args.collection}")
        elif command == "workflow":
            sub = args.workflow_command
            if sub == "submit":
                assert spec is not None  # loaded and validated above
                if args.watch:  # one call: the workflow first, then its events
                    updates = client.run_workflow(spec, args.idempotency_key)
                    submitted = (await anext(updates)).workflow
                    _emit(args, submitted, lambda: _workflow_lines(submitted))
                    return await _follow(args, (u.event async for u in updates))
                submitted = (await client.submit_workflow(spec, args.idempotency_key)).workflow
                _emit(args, submitted, lambda: _workflow_lines(submitted))
            elif sub == "ls":
                page = await client.list_workflows(state, args.page_size, args.page_token)
                _emit(
                    args,
                    page,
                    lambda: (
                        "\n".join(
                            [_workflow_lines(w).splitlines()[0] for w in page.workflows]
                            + (
                                [f"next page: --page-token {page.next_page_token}"]
                                if page.next_page_token
                                else []
                            )
                        )
                        or "no workflows"
                    ),
                )
            elif sub == "get":
                got = (await client.get_workflow(args.workflow_id)).workflow
                _emit(args, got, lambda: _workflow_lines(got))
            elif sub == "cancel":
                cancelled = (await client.cancel_workflow(args.workflow_id)).workflow
                _emit(args, cancelled, lambda: _workflow_lines(cancelled))
            else:
                return await _follow(args, client.watch_workflow(args.workflow_id))
        elif command == "breakers":
            from aiwfe.system.v1 import system_service_pb2 as sys_pb

            listed = await client.list_circuit_breakers()

            def human_breakers() -> str:
                lines = [
                    f"{b.service:<14} -> {b.downstream:<14} "
                    f"{_enum(sys_pb.BreakerState, b.state, 'BREAKER_STATE_'):<10} "
                    f"failures {b.failure_count}"
                    + (
                        f", open {b.open_remaining_seconds:.0f} s"
                        if b.open_remaining_seconds
                        else ""
                    )
                    for b in listed.breakers
                ]
                lines += [f"unreachable: {name}" for name in listed.unreachable_services]
                return "\n".join(lines) or "no breakers"

            _emit(args, listed, human_breakers)
        elif command == "users":
            sub = args.users_command
            if sub == "create":
                made = await client.create_user(args.username, password or "", args.roles)
                _emit(args, made, lambda: _user_line(made.user))
            elif sub == "ls":
                users = await client.list_users(args.page_size, args.page_token)
                _emit(
                    args,
                    users,
                    lambda: "\n".join(
                        [_user_line(u) for u in users.users]
                        + (
                            [f"next page: --page-token {users.next_page_token}"]
                            if users.next_page_token
                            else []
                        )
                    ),
                )
            elif sub == "set-roles":
                changed = await client.set_user_roles(args.username, args.roles)
                _emit(args, changed, lambda: _user_line(changed.user))
            else:
                off = await client.disable_user(args.username)
                _emit(args, off, lambda: _user_line(off.user))
    return 0


def _run(coro: Awaitable[int]) -> int:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as exc:
        print(rpc_error_line(exc), file=sys.stderr)
        return EXIT_RPC_ERROR
    except (UsageError, ConfigError) as exc:
        print(f"aiwfe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _health(args: argparse.Namespace) -> int:
    from aiwfe.channels import channel_credentials

    address = args.address or args.gateway
    creds = None
    if args.tls or args.ca_file or args.cert_file:
        creds = channel_credentials(args.ca_file, args.cert_file, args.key_file)

    async def probe() -> int:
        status = await check_health(address, args.service, args.timeout, creds)
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
    except ConfigError as exc:
        print(f"aiwfe: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _bench(extra: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").exists():
        print(
            "aiwfe: bench needs a source checkout (benchmarks/ is not installed)", file=sys.stderr
        )
        return EXIT_USAGE
    return subprocess.call([sys.executable, "-m", "benchmarks", *extra], cwd=root)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
    if args.command == "health":
        raise SystemExit(_health(args))
    if args.command == "bench":
        raise SystemExit(_bench(args.args))
    if args.command == "models":
        from cognitive import models_command

        raise SystemExit(models_command.run(args))
    raise SystemExit(_run(run_api_command(args)))


if __name__ == "__main__":  # pragma: no cover
    main()
