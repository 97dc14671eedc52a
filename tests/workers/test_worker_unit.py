"""The SDK worker's own logic against an in-process fake WorkerService: input binding,
results, heartbeats, cancellation, lost tasks, bounded concurrency, shutdown and
reconnection. The engine's side is proven with the real suite in test_external_workers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from aiwfe.app.embedded import free_port
from aiwfe.sdk import NonRetryableError, Worker, current_task, task
from aiwfe.sdk.worker import (
    InputBindingError,
    definition,
    from_value,
    heartbeat_interval,
    output_struct,
    tasks_in_module,
)
from tests.conftest import until
from tests.workers.fake_service import FakeWorkerService, serve, value

# --- pure functions ---------------------------------------------------------------------


@task("summarize")
async def summarize(text: str, max_words: int = 3) -> dict[str, Any]:
    return {"summary": " ".join(text.split()[:max_words])}


@task
def double(n: int) -> int:
    return n * 2


def test_task_names_default_to_the_function_name() -> None:
    """@task("x") names the type x, bare @task uses the function's name, and the function
    stays callable."""
    assert definition(summarize).name == "summarize"
    assert definition(double).name == "double"
    assert double(4) == 8
    import tests.workers.test_worker_unit as me

    assert {d.name for d in tasks_in_module(me)} >= {"summarize", "double"}


def test_a_dict_binds_to_keywords_with_defaults_and_anything_else_to_one_parameter() -> None:
    """A JSON object binds by keyword (defaults fill the rest); a number binds to the one
    positional parameter; null binds to a function without required parameters."""
    assert definition(summarize).bind({"text": "a b"}) == (("a b",), {})
    assert definition(summarize).bind({"max_words": 1, "text": "a"}) == (("a", 1), {})
    assert definition(double).bind(21) == ((21,), {})

    def nothing(flag: bool = False) -> None: ...

    assert definition(nothing).bind(None) == ((), {})


def test_input_that_cannot_be_bound_says_why() -> None:
    """An unknown keyword, a missing parameter or a scalar for a two-parameter function
    raises InputBindingError naming the task, its signature and the JSON kind."""
    with pytest.raises(InputBindingError, match=r"task 'summarize'.*unexpected keyword.*ext"):
        definition(summarize).bind({"ext": "x"})
    with pytest.raises(InputBindingError, match=r"missing a required argument: 'text'"):
        definition(summarize).bind({})

    def two(a: int, b: int) -> int:
        return a + b

    with pytest.raises(InputBindingError, match=r"missing a required argument: 'b'.*JSON array"):
        definition(two).bind([1, 2])


def test_whole_numbers_arrive_as_int_and_results_become_structs() -> None:
    """JSON numbers that are whole are ints; a dict result is the output and any other
    value is {"result": value}."""
    assert from_value(value({"n": 3, "x": 1.5, "l": [1, None, True]})) == {
        "n": 3, "x": 1.5, "l": [1, None, True]
    }  # fmt: skip
    assert dict(output_struct({"a": "b"})) == {"a": "b"}
    assert dict(output_struct(7)) == {"result": 7}
    with pytest.raises((TypeError, ValueError)):
        output_struct({"a": object()})


def test_names_the_contract_refuses_are_refused_at_construction() -> None:
    """A queue or task name outside the contract's 1-64 [A-Za-z0-9._-] is a ValueError
    when the Worker is built, not a refused poll later."""
    with pytest.raises(ValueError, match="queue 'a:b'"):
        Worker("127.0.0.1:1", "k", queues=["a:b"], tasks=[double])
    with pytest.raises(ValueError, match="task 'sum marize'"):
        Worker("127.0.0.1:1", "k", tasks=[definition(double, "sum marize")])
    with pytest.raises(ValueError, match="two functions serve task 'double'"):
        Worker("127.0.0.1:1", "k", tasks=[double, definition(summarize, "double")])


def test_heartbeats_go_out_at_a_third_of_the_timeout() -> None:
    """A task heartbeats three times per heartbeat timeout (two may be lost in a row)."""
    assert heartbeat_interval(30) == 10
    assert heartbeat_interval(0.3) == pytest.approx(0.1)


# --- against the fake service -----------------------------------------------------------


class Harness:
    def __init__(self, service: FakeWorkerService, address: str) -> None:
        self.service = service
        self.address = address
        self.workers: list[tuple[Worker, asyncio.Task[None]]] = []

    def start(self, *tasks: Any, **kwargs: Any) -> Worker:
        worker = Worker(self.address, "k3y", queues=["default"], tasks=tasks, **kwargs)
        self.workers.append((worker, asyncio.create_task(worker.run_async())))
        return worker

    async def stop(self, worker: Worker) -> None:
        worker.stop()
        run = next(t for w, t in self.workers if w is worker)
        await asyncio.wait_for(run, 20)


@pytest.fixture
async def fake() -> AsyncIterator[Harness]:
    service = FakeWorkerService()
    server, port = await serve(service)
    harness = Harness(service, f"127.0.0.1:{port}")
    yield harness
    for worker, run in harness.workers:
        worker.stop()
        await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 20)
    await server.stop(0)


async def test_sync_and_async_functions_complete_with_their_outputs(fake: Harness) -> None:
    """An async and a sync function run; their outputs (dict as is, int wrapped) are
    completed with the bearer key on every call."""
    fake.start(summarize, double)
    a = fake.service.offer("summarize", {"text": "one two three four"})
    b = fake.service.offer("double", 21)
    await fake.service.answered(a)
    await fake.service.answered(b)
    assert fake.service.completed == {a: {"summary": "one two three"}, b: {"result": 42.0}}
    assert {m.get("authorization") for m in fake.service.metadata} == {"Bearer k3y"}


async def test_a_shed_completion_is_sent_again_after_retry_after(fake: Harness) -> None:
    """CompleteTask refused with RESOURCE_EXHAUSTED and `retry-after: 1` is sent again
    after that second, not dropped."""
    fake.service.shed_completes = 1
    fake.start(double)
    token = fake.service.offer("double", 2)
    started = time.monotonic()
    await fake.service.answered(token)
    assert time.monotonic() - started >= 0.9
    assert (fake.service.completes_refused, fake.service.completed) == (1, {token: {"result": 4.0}})


async def test_failures_are_retryable_unless_non_retryable_or_unbindable(fake: Harness) -> None:
    """A plain exception fails retryable; NonRetryableError and unbindable input fail
    for good, with messages that say why."""

    @task("boom")
    def boom(kind: str) -> None:
        if kind == "final":
            raise NonRetryableError("bad data")
        raise RuntimeError("flaky")

    fake.start(boom, summarize)
    flaky = fake.service.offer("boom", {"kind": "flaky"})
    final = fake.service.offer("boom", {"kind": "final"})
    unbound = fake.service.offer("summarize", {"txt": "x"})
    for token in (flaky, final, unbound):
        await fake.service.answered(token)
    failed = fake.service.failed
    assert (failed[flaky].retryable, failed[flaky].message) == (True, "RuntimeError: flaky")
    assert (failed[final].retryable, failed[final].message) == (
        False, "NonRetryableError: bad data"
    )  # fmt: skip
    assert failed[unbound].retryable is False
    assert "unexpected keyword argument 'txt'" in failed[unbound].message
    assert not fake.service.completed


async def test_heartbeats_carry_details_and_cancellation_reaches_both_kinds(fake: Harness) -> None:
    """Heartbeats go out within the timeout with the details heartbeat() recorded;
    cancel_requested cancels an async function (CancelledError) and sets the sync one's
    flag; both are failed as not retryable."""
    fake.service.heartbeat_timeout = 0.6
    seen: dict[str, Any] = {}
    proceed = threading.Event()

    @task("slow_async")
    async def slow_async() -> None:
        current_task().heartbeat({"stage": "started"})
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["async"] = "cancelled"
            raise

    @task("slow_sync")
    def slow_sync() -> None:
        info = current_task()
        while not info.cancelled:
            time.sleep(0.01)
        seen["sync"] = info.cancel_reason
        proceed.set()

    fake.start(slow_async, slow_sync)
    a = fake.service.offer("slow_async", None)
    s = fake.service.offer("slow_sync", None)
    started = time.monotonic()
    await until(lambda: sum(h.task_token == a for h in fake.service.heartbeats) >= 2)
    assert time.monotonic() - started < 2  # every 0.2 s: two lost ones would be 1.2 s
    beats = [h for h in fake.service.heartbeats if h.task_token == a]
    assert dict(beats[0].details) == {"stage": "started"}
    fake.service.cancel |= {a, s}
    await fake.service.answered(a)
    await fake.service.answered(s)
    assert seen["async"] == "cancelled"
    assert proceed.wait(5) and "cancelled" in seen["sync"]
    assert fake.service.failed[a].retryable is False
    assert fake.service.failed[s].message.startswith("cancelled:")
    assert not fake.service.completed


async def test_a_lost_task_is_dropped_without_an_answer(fake: Harness) -> None:
    """FAILED_PRECONDITION on a heartbeat (the token went stale) cancels the function and
    sends neither CompleteTask nor FailTask."""
    fake.service.heartbeat_timeout = 0.3
    cancelled = asyncio.Event()

    @task("long")
    async def long() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cancelled.set()

    fake.start(long)
    token = fake.service.offer("long", None)
    fake.service.stale.add(token)
    await asyncio.wait_for(cancelled.wait(), 5)
    await asyncio.sleep(0.3)
    assert token not in fake.service.completed and token not in fake.service.failed


async def test_polls_only_while_a_slot_is_free(fake: Harness) -> None:
    """With concurrency 2, at most two tasks run and no poll is open while both run."""
    running = 0
    peak = 0
    release = asyncio.Event()

    @task("hold")
    async def hold() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    fake.start(hold, concurrency=2, pollers=4)
    tokens = [fake.service.offer("hold", None) for _ in range(5)]
    await until(lambda: running == 2)
    await asyncio.sleep(0.2)
    assert (running, fake.service.polls_open, fake.service.tasks.qsize()) == (2, 0, 3)
    release.set()
    for token in tokens:
        await fake.service.answered(token)
    assert peak == 2 and fake.service.max_polls_open <= 2


async def test_shutdown_finishes_quick_tasks_and_hands_back_slow_ones(fake: Harness) -> None:
    """stop() lets a task that ends within the grace complete, then fails the one that
    does not as retryable "worker shutting down"."""

    @task("nap")
    async def nap(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "rested"

    worker = fake.start(nap, shutdown_grace=0.5)
    quick = fake.service.offer("nap", 0.2)
    slow = fake.service.offer("nap", 30)
    await until(lambda: worker.in_flight == 2)
    started = time.monotonic()
    await fake.stop(worker)
    assert time.monotonic() - started < 3
    assert fake.service.completed == {quick: {"result": "rested"}}
    assert (fake.service.failed[slow].retryable, fake.service.failed[slow].message) == (
        True, "worker shutting down"
    )  # fmt: skip


async def test_reconnects_with_backoff_when_the_gateway_comes_up_late() -> None:
    """A worker started before its gateway keeps polling with backoff and serves once the
    gateway is up."""
    port = free_port()
    worker = Worker(f"127.0.0.1:{port}", "k", tasks=[double])
    run = asyncio.create_task(worker.run_async())
    await asyncio.sleep(1.0)
    service = FakeWorkerService()
    server, _ = await serve(service, port)
    try:
        token = service.offer("double", 5)
        await service.answered(token, within=10)
        assert service.completed[token] == {"result": 10.0}
    finally:
        worker.stop()
        await asyncio.wait_for(run, 20)
        await server.stop(0)


async def test_the_task_span_is_a_child_of_the_tasks_traceparent(fake: Harness) -> None:
    """With an OpenTelemetry SDK provider, the task runs in a CONSUMER span whose parent is
    the span the task's traceparent names, in its trace; code in the task sees it as
    current."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # the worker's own: the process-wide one is left alone
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[int] = []

    @task("traced")
    def traced() -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    fake.start(traced, tracer_provider=provider)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    token = fake.service.offer("traced", None, traceparent=f"00-{trace_id}-{parent_id}-01")
    await fake.service.answered(token)
    (span,) = exporter.get_finished_spans()
    assert (span.name, span.kind) == ("task traced", SpanKind.CONSUMER)
    assert span.parent is not None
    assert (format(span.context.trace_id, "032x"), format(span.parent.span_id, "016x")) == (
        trace_id, parent_id
    )  # fmt: skip
    assert seen == [span.context.trace_id]
    assert span.attributes is not None and span.attributes["aiwfe.task.type"] == "traced"


async def test_sync_functions_run_on_at_most_concurrency_threads_across_restarts(
    fake: Harness,
) -> None:
    """Twelve sync tasks with concurrency 3 never run more than three at once, on at most
    three threads, and a stopped worker serves again when run anew."""
    lock = threading.Lock()
    running, peak, threads = 0, 0, set()

    @task("busy")
    def busy() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        time.sleep(0.05)
        with lock:
            running -= 1

    worker = fake.start(busy, concurrency=3)
    first = [fake.service.offer("busy", None) for _ in range(6)]
    for token in first:
        await fake.service.answered(token)
    await fake.stop(worker)
    # The fake hands a task to a poll the worker already gave up unless that poll's
    # handler has ended (the real server gives such a task back).
    await until(lambda: fake.service.polls_open == 0)
    fake.workers.append((worker, asyncio.create_task(worker.run_async())))
    second = [fake.service.offer("busy", None) for _ in range(6)]
    for token in second:
        await fake.service.answered(token)
    assert set(fake.service.completed) == set(first + second)
    assert peak == 3 and len(threads) <= 6


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["tests.workers.worker_tasks"], {}, "no API key: set $AIWFE_API_KEY"),
        (["tests.workers.worker_tasks", "--api-key-env", "MY_KEY"], {}, "set $MY_KEY"),
        (["no_such_module_here"], {"AIWFE_API_KEY": "k"}, "cannot import no_such_module_here"),
        (["json"], {"AIWFE_API_KEY": "k"}, "json has no @task functions"),
        (["tests.workers.worker_tasks", "--queue", "a:b"], {"AIWFE_API_KEY": "k"},
         "queue 'a:b'"),
    ],
)  # fmt: skip
def test_worker_run_usage_errors_exit_2_saying_why(
    argv: list[str], env: dict[str, str], message: str, monkeypatch, capsys
) -> None:
    """`aiwfe worker run` without a key, with an unimportable module, a module without
    @task functions or a queue name the contract refuses exits 2 before connecting."""
    from aiwfe.app import cli

    monkeypatch.delenv("AIWFE_API_KEY", raising=False)
    for key, setting in env.items():
        monkeypatch.setenv(key, setting)
    code = cli._run(cli.build_parser().parse_args(["worker", "run", *argv]))
    assert code == 2
    assert message in capsys.readouterr().err
