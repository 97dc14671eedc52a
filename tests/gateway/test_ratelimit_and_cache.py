"""Rate limits (login per username and per address, API per user) with full refusal
details, and the per-user API response cache."""

from __future__ import annotations

import asyncio
import bisect
import copy
import math
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.config import RateLimitSettings, RedisSettings
from aiwfe.runtime.errors import ResourceExhausted
from aiwfe.runtime.redis_client import RedisClient
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from gateway import auth_service
from gateway.ratelimit import MAX_QUEUED_LOGINS, ApiLimiter, _refusal
from tests.conftest import bearer, login, redis_for
from tests.dataplatform import test_redis_helpers
from tests.gateway.conftest import PASSWORD, Gateway, gateway_overrides
from tests.taskproc.helpers import new_user

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
redis_helper = test_redis_helpers.redis  # the real Redis under a key prefix of its own


def refusal(err: grpc.aio.AioRpcError) -> tuple[float, list[str], dict[str, str]]:
    """(retry delay, quota subjects, trailing metadata) of a RESOURCE_EXHAUSTED status."""
    status = rpc_status.from_call(err)
    assert status is not None
    delay, subjects = -1.0, []
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            subjects = [v.subject for v in quota.violations]
    trailers = {k: v for k, v in err.trailing_metadata() or () if isinstance(v, str)}
    return delay, subjects, trailers


async def failed_login(gw, username: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.login(username, "definitely-the-wrong-password")
    return err.value.code()


async def test_login_brute_force_is_exhausted_per_username(gw_any) -> None:
    """Five failures lock that username (even for the right password) with RetryInfo,
    QuotaFailure and rate-limit metadata; another user still logs in."""
    gw = gw_any
    victim = await gw.create_user(["user"], "victim")
    bystander = await gw.create_user(["user"], "bystander")
    codes = [await failed_login(gw, victim) for _ in range(5)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.login(victim)  # the right password, but locked
    assert err.value.code() == EXHAUSTED
    delay, subjects, trailers = refusal(err.value)
    assert 0 < delay <= 300
    assert subjects == ["login:username"]
    assert trailers["x-ratelimit-limit"] == "5"
    assert trailers["x-ratelimit-remaining"] == "0"
    assert 0 < int(trailers["x-ratelimit-reset"]) <= 300
    # One figure, said three ways: the trailers and the message agree, RetryInfo rounded up.
    assert trailers["retry-after"] == trailers["x-ratelimit-reset"] == str(math.ceil(delay))
    assert f"retry in {trailers['retry-after']} s" in (err.value.details() or "")
    assert (await gw.login(bystander)).access_token


@pytest.mark.slow
async def test_successful_logins_do_not_count(gw) -> None:
    """Logins that succeed give their reserved attempt back."""
    name = await gw.create_user(["user"], "good")
    for _ in range(8):
        assert (await gw.login(name)).access_token


@pytest.mark.slow
async def test_one_address_cannot_spray_usernames(gw) -> None:
    """Twenty failures over many usernames exhaust the client address."""
    codes = [await failed_login(gw, f"spray-{i}") for i in range(20)]
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.login("spray-new-name", "whatever-password")
    assert err.value.code() == EXHAUSTED
    _, subjects, trailers = refusal(err.value)
    assert subjects == ["login:client_address"]
    assert trailers["x-ratelimit-limit"] == "20"


@pytest.fixture(params=["redis", "no_redis"])
async def small_api_limit(request, base_overrides):
    """A suite whose API limit is 12 requests per minute (30 for admins)."""
    redis_url = redis_for(request, request.param == "redis")
    overrides = copy.deepcopy(gateway_overrides(base_overrides, redis_url))
    overrides["authentication"]["rate_limiting"] = {
        "api_requests": 12,
        "api_requests_per_role": {"admin": 30},
    }
    suite = await start_suite(overrides, only=("dataplatform", "gateway"))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            yield suite, channel
    finally:
        await suite.stop()


async def test_api_limit_per_user_with_details(small_api_limit) -> None:
    """The 13th call of a user in a window is RESOURCE_EXHAUSTED with details; a second
    replica shares the same budget through Redis; admins get their role's higher limit."""
    suite, channel = small_api_limit
    admin = await login(channel)
    auth = auth_grpc.AuthServiceStub(channel)
    await auth_grpc.UserAdminServiceStub(channel).CreateUser(
        auth_pb.CreateUserRequest(
            username=f"limited-{id(suite)}", password="a-long-enough-passphrase-42", roles=["user"]
        ),
        metadata=bearer(admin),
        timeout=5,
    )
    token = await login(channel, f"limited-{id(suite)}", "a-long-enough-passphrase-42")
    ok = 0
    refused = None
    for _ in range(20):
        try:
            await auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=bearer(token), timeout=5)
            ok += 1
        except grpc.aio.AioRpcError as err:
            refused = err
            break
    assert ok == 12
    assert refused is not None and refused.code() == EXHAUSTED
    delay, subjects, trailers = refusal(refused)
    assert 0 < delay <= 61 and subjects == ["api:user"]
    assert trailers["x-ratelimit-limit"] == "12"
    admin_ok = 0
    for _ in range(16):  # the admin already spent 1 on CreateUser
        await auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=bearer(admin), timeout=5)
        admin_ok += 1
    assert admin_ok == 16


async def test_cacheable_rpc_is_served_from_the_response_cache(gw) -> None:
    """A repeated Embed by the same user is answered from the gateway's cache (the same
    bytes, even though the back end would now report a cache hit); another user is not."""
    stub = cog_grpc.CognitiveServiceStub(gw.channel)
    request = cog_pb.EmbedRequest(texts=[f"response cache probe {id(gw)}"])
    first = await stub.Embed(request, metadata=bearer(gw.admin_token), timeout=10)
    second = await stub.Embed(request, metadata=bearer(gw.admin_token), timeout=10)
    assert first.cached_count == 0
    assert second == first  # replayed bytes: the back end was not asked
    other = await gw.create_user(["user"], "cache")
    token = (await gw.login(other)).access_token
    theirs = await stub.Embed(request, metadata=bearer(token), timeout=10)
    assert theirs.cached_count == 1  # their own key: the back end answered (from its cache)
    key_count = 0
    redis = gw.suite.running["gateway"].service.redis
    async for _ in redis.client.scan_iter(match=redis.key("api:*"), count=100):
        key_count += 1
    assert key_count == 2


async def test_no_cache_metadata_skips_the_response_cache(gw) -> None:
    """`cache-control: no-cache` makes the gateway ask the back end again (which then
    reports its own content-cache hit) instead of replaying the stored bytes."""
    stub = cog_grpc.CognitiveServiceStub(gw.channel)
    request = cog_pb.EmbedRequest(texts=[f"no-cache probe {id(gw)}"])
    first = await stub.Embed(request, metadata=bearer(gw.admin_token), timeout=10)
    fresh = await stub.Embed(
        request,
        metadata=(*bearer(gw.admin_token), ("cache-control", "no-cache")),
        timeout=10,
    )
    assert first.cached_count == 0
    assert fresh.cached_count == 1  # the back end answered, from its content cache
    replay = await stub.Embed(request, metadata=bearer(gw.admin_token), timeout=10)
    assert replay == fresh  # the fresh answer replaced the stored one


# --- Exact API limits (#17 item 5) -----------------------------------------------------------


@pytest.fixture(params=["redis", "no_redis"])
async def seed_api_limit(request, base_overrides):
    """dataplatform, taskproc and a gateway with the seed's API limit (100 calls per 60 s
    for role `user`), with Redis or without."""
    redis_url = redis_for(request, request.param == "redis")
    async for g in _limited_gateway(base_overrides, redis_url, window=60):
        yield g


async def _limited_gateway(base, redis_url: str | None, window: int) -> AsyncIterator[Gateway]:
    overrides = copy.deepcopy(gateway_overrides(base, redis_url))
    overrides["authentication"]["rate_limiting"] = {
        "api_requests": 100,
        "api_window": window,
        "api_requests_per_role": {"admin": 100_000},
    }
    # The limiter alone decides: a call it admitted that load shedding then refused would
    # count as a refusal here with its quota spent (CI once saw (96, 34) on a busy machine).
    overrides["load_shedding"] = {"enabled": False}
    # Nor may Redis's 0.5 s budget lapse under a loaded CI (two suites side by side): the
    # limiter would rightly degrade to each replica's own count ((130, 0) once, 2 replicas).
    overrides["redis"] = {**overrides.get("redis", {}), "connection_pool": {"socket_timeout": 5}}
    suite = await start_suite(overrides, only=("dataplatform", "taskproc", "gateway"))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            yield Gateway(suite, channel, await login(channel))
    finally:
        await suite.stop()


async def burst(
    addresses: list[str], token: str, n: int, connections: int = 10
) -> tuple[list[float], list[grpc.aio.AioRpcError]]:
    """`n` concurrent GetWorkflow calls (unknown ids: NOT_FOUND once admitted) spread over
    `connections` channels to each address: (completion times of the admitted calls, the
    refusals)."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses for _ in range(connections)]

    async def one(channel: grpc.aio.Channel) -> float | grpc.aio.AioRpcError:
        stub = wf_grpc.WorkflowServiceStub(channel)
        request = wf_pb.GetWorkflowRequest(workflow_id=str(uuid.uuid4()))
        try:
            await stub.GetWorkflow(request, metadata=bearer(token), timeout=30)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                assert err.code() == EXHAUSTED, err
                return err
        return time.monotonic()

    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        results = await asyncio.gather(*(one(channels[i % len(channels)]) for i in range(n)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    admitted = [r for r in results if isinstance(r, float)]
    return admitted, [r for r in results if not isinstance(r, float)]


def assert_final_refusals(refused: list[grpc.aio.AioRpcError], window: float) -> None:
    """Every refusal says remaining 0 and when to retry (within the window)."""
    for err in refused:
        delay, subjects, trailers = refusal(err)
        assert 0 < delay <= window + 1 and subjects == ["api:user"]
        assert trailers["x-ratelimit-remaining"] == "0"
        assert trailers["x-ratelimit-limit"] == "100"


async def test_concurrent_burst_admits_exactly_the_limit(seed_api_limit) -> None:
    """130 concurrent calls of one user admit exactly 100; the 30 refusals carry RetryInfo
    and remaining 0, and they are true: no further call in the window succeeds."""
    gw = seed_api_limit
    token = await new_user(gw.suite, gw.channel)
    address = gw.suite.address("gateway")
    admitted, refused = await burst([address], token, 130)
    assert (len(admitted), len(refused)) == (100, 30)
    assert_final_refusals(refused, 60)
    later, refused_later = await burst([address], token, 10)
    assert (len(later), len(refused_later)) == (0, 10)


async def test_two_replicas_share_the_limit_exactly(base_overrides, redis_url) -> None:
    """130 concurrent calls of one user split over two gateway replicas sharing Redis
    admit exactly 100 in total."""
    async for gw in _limited_gateway(base_overrides, redis_url, window=60):
        token = await new_user(gw.suite, gw.channel)
        second = await gw.second_gateway()
        addresses = [gw.suite.address("gateway"), f"127.0.0.1:{second.port}"]
        try:
            admitted, refused = await burst(addresses, token, 130)
            assert (len(admitted), len(refused)) == (100, 30)
            assert_final_refusals(refused, 60)
            more = await burst(addresses[::-1], token, 10)
            assert (len(more[0]), len(more[1])) == (0, 10)
        finally:
            await second.stop(0)


async def test_window_slides_not_resets(base_overrides, redis_url) -> None:
    """With a 3 s window, bursts just before and just after a 3 s clock boundary admit 100
    together (a fixed window would admit 200), no 3 s span holds more than 100, and once
    both have slid out the user gets exactly 100 again."""
    window = 3
    async for gw in _limited_gateway(base_overrides, redis_url, window=window):
        token = await new_user(gw.suite, gw.channel)
        boundary = (time.time() // window + 2) * window
        await asyncio.sleep(boundary - 0.6 - time.time())
        before, _ = await burst([gw.suite.address("gateway")], token, 130)
        await asyncio.sleep(max(0.0, boundary + 0.05 - time.time()))
        after, _ = await burst([gw.suite.address("gateway")], token, 130)
        assert len(before) + len(after) == 100
        # Both bursts slid out (a loaded machine may have admitted some of the 100 after
        # the boundary): the user gets exactly 100 again.
        await asyncio.sleep(max(before + after) + window + 0.5 - time.monotonic())
        slid, refused = await burst([gw.suite.address("gateway")], token, 130)
        assert (len(slid), len(refused)) == (100, 30)
        times = sorted(before + after + slid)
        # Completion times lag the decisions by at most a call's latency: 0.3 s of slack.
        assert all(
            bisect.bisect_right(times, t + window - 0.3) - i <= 100 for i, t in enumerate(times)
        )


# --- The login limiter counts verified failures only (#17 item 6) ---------------------------


class PasswordChecks:
    """Counts the gateway's password verifications; `hold()` keeps them waiting (until
    `open` is set)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = 0
        self.open = asyncio.Event()
        self.open.set()
        real = auth_service.verify_password_async

        async def verify(password_hash: str | None, password: str) -> bool:
            self.started += 1
            await self.open.wait()
            return await real(password_hash, password)

        monkeypatch.setattr(auth_service, "verify_password_async", verify)

    def hold(self) -> None:
        self.open.clear()


@pytest.fixture
async def password_checks(gw_any, monkeypatch) -> AsyncIterator[PasswordChecks]:
    """The gateway's password checks counted (and released before the suite stops)."""
    checks = PasswordChecks(monkeypatch)
    yield checks
    checks.open.set()


async def test_concurrent_correct_logins_are_never_refused(gw_any) -> None:
    """Ten concurrent logins of one user with the right password all succeed."""
    name = await gw_any.create_user(["user"], "busy")
    request = auth_pb.LoginRequest(username=name, password=PASSWORD)
    # Ten argon2 checks: a generous deadline on a loaded machine.
    replies = await asyncio.gather(*(gw_any.auth.Login(request, timeout=60) for _ in range(10)))
    assert all(r.access_token for r in replies)


async def test_abandoned_logins_count_nothing(gw_any, password_checks) -> None:
    """Six correct logins whose client gives up while the password is being checked
    count nothing: the next login succeeds."""
    checks = password_checks
    name = await gw_any.create_user(["user"], "impatient")
    checks.hold()
    codes = []
    for err in await asyncio.gather(
        *(
            gw_any.auth.Login(auth_pb.LoginRequest(username=name, password=PASSWORD), timeout=2)
            for _ in range(6)
        ),
        return_exceptions=True,
    ):
        assert isinstance(err, grpc.aio.AioRpcError)
        codes.append(err.code())
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 6
    assert checks.started >= 5  # they were inside the check when abandoned
    checks.open.set()
    assert (await gw_any.login(name)).access_token


async def test_parallel_brute_force_verifies_at_most_the_limit(gw_any, password_checks) -> None:
    """Twenty concurrent wrong passwords for one username get exactly five verifications
    (five UNAUTHENTICATED, fifteen RESOURCE_EXHAUSTED); the username is then locked even
    for the right password."""
    checks = password_checks
    name = await gw_any.create_user(["user"], "target")
    request = auth_pb.LoginRequest(username=name, password="definitely-the-wrong-password")
    results = await asyncio.gather(
        *(gw_any.auth.Login(request, timeout=60) for _ in range(20)), return_exceptions=True
    )
    codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else r for r in results]
    assert sorted(map(str, codes)) == sorted(
        [str(grpc.StatusCode.UNAUTHENTICATED)] * 5 + [str(EXHAUSTED)] * 15
    )
    assert checks.started == 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw_any.login(name)
    assert err.value.code() == EXHAUSTED
    delay, subjects, _ = refusal(err.value)
    assert 240 < delay <= 300 and subjects == ["login:username"]


async def test_a_login_flood_is_not_queued_without_bound(gw_any, password_checks) -> None:
    """Of 80 concurrent logins for one username while five checks are held, at most 64
    wait for a slot and the rest (11 to 16, as the slots were taken while they arrived)
    are refused at once; the five wrong passwords then lock the username and every
    waiting login is refused too."""
    name = await gw_any.create_user(["user"], "flooded")
    password_checks.hold()
    request = auth_pb.LoginRequest(username=name, password="definitely-the-wrong-password")
    calls = [asyncio.ensure_future(gw_any.auth.Login(request, timeout=60)) for _ in range(80)]
    until = time.monotonic() + 30
    while password_checks.started < 5 or sum(c.done() for c in calls) < 11:
        assert time.monotonic() < until, "the flood was neither checked nor refused"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # nothing more ends while the checks are held
    done = {c for c in calls if c.done()}
    assert 11 <= len(done) <= 16 and password_checks.started == 5
    flood = [refusal(c.exception())[2]["x-ratelimit-limit"] for c in done]
    assert flood == [str(MAX_QUEUED_LOGINS)] * len(done)
    password_checks.open.set()
    await asyncio.wait(calls)
    codes = sorted(str(c.exception().code()) for c in calls if c not in done)
    assert codes == sorted(
        [str(grpc.StatusCode.UNAUTHENTICATED)] * 5 + [str(EXHAUSTED)] * (75 - len(done))
    )
    assert password_checks.started == 5


def api_limiter(redis: RedisClient, window: int = 60) -> ApiLimiter:
    """A gateway replica's API limiter (100 calls per window) on `redis`."""
    return ApiLimiter(RateLimitSettings(api_requests=100, api_window=window), redis)


async def admitted_of(limiters: list[ApiLimiter], user: str, n: int) -> int:
    """How many of `n` concurrent acquisitions (spread over the replicas) are admitted."""

    async def one(limiter: ApiLimiter) -> bool:
        try:
            await limiter.acquire(user, ("user",))
        except ResourceExhausted as exc:
            assert exc.headers["x-ratelimit-remaining"] == "0" and exc.retry_after
            return False
        return True

    results = await asyncio.gather(*(one(limiters[i % len(limiters)]) for i in range(n)))
    return sum(results)


@pytest.mark.parametrize("store,replicas", [("redis", 1), ("redis", 2), ("in_process", 1)])
async def test_limiter_is_exact_for_concurrent_callers(redis_helper, store, replicas) -> None:
    """130 callers of one user waiting on the limiters at once (one or two replicas sharing
    Redis, or one without Redis) get exactly 100 admissions, and none later in the window
    (neither through the fast path)."""
    redis = redis_helper if store == "redis" else RedisClient(RedisSettings())
    limiters = [api_limiter(redis) for _ in range(replicas)]
    assert await admitted_of(limiters, "u1", 130) == 100
    assert await admitted_of(limiters, "u1", 20) == 0
    assert not any(limiter.try_local("u1") for limiter in limiters)


async def test_unspent_reservations_go_back(redis_helper) -> None:
    """Calls one replica reserved for its fast path and never spends are not lost: when
    the user moves to another replica, that one still admits up to exactly 100."""
    first, second = api_limiter(redis_helper), api_limiter(redis_helper)
    spent = 0
    while not first.try_local("u2"):  # a busy user: the replica reserves calls ahead
        await first.acquire("u2", ("user",))
        spent += 1
    spent += 1
    assert first.try_local("u2")  # more are reserved there, never to be spent
    spent += 1
    assert await admitted_of([second], "u2", 130) == 100 - spent
    assert await admitted_of([first, second], "u2", 10) == 0


async def test_a_stopping_replica_gives_its_unspent_reservations_back(redis_helper) -> None:
    """close() (the gateway's stop) settles the replica's open lease at once: the user's
    count in Redis drops to the calls spent. Without it the reserved calls stayed counted
    for the whole window (as for a crashed replica), refusing the user's calls elsewhere
    after a rolling restart; here the lease (3 s) cannot end by itself meanwhile."""
    settings = RateLimitSettings(api_requests=100, api_window=60, api_reserve_lease_ms=3000)
    limiter = ApiLimiter(settings, redis_helper)
    spent = 0
    while not limiter.try_local("u3"):
        await limiter.acquire("u3", ("user",))
        spent += 1
    spent += 1
    counts = limiter._keys("u3")[2]
    assert redis_helper.client is not None
    assert int(await redis_helper.client.hget(counts, "#")) > spent  # reserved ahead
    await limiter.close()
    assert int(await redis_helper.client.hget(counts, "#")) == spent
    assert not limiter.try_local("u3")
    assert await admitted_of([api_limiter(redis_helper)], "u3", 130) == 100 - spent


@pytest.mark.parametrize("store", ["redis", "in_process"])
async def test_a_busy_users_fast_path_quota_is_renewed_before_it_runs_out(
    redis_helper, store
) -> None:
    """Once a user's leases have grown to its pace (the first 200 calls), 2,000 more spent
    on the fast path never find it empty: each lease is renewed in the background while
    its second half is spent (without that, every lease's end sent calls to the full
    path)."""
    redis = redis_helper if store == "redis" else RedisClient(RedisSettings())
    limiter = ApiLimiter(RateLimitSettings(api_requests=1_000_000, api_window=60), redis)
    await limiter.acquire("busy", ("user",))
    await asyncio.sleep(0.01)
    dry = 0
    for i in range(2200):
        if not limiter.try_local("busy"):
            dry += i >= 200
            await limiter.acquire("busy", ("user",))  # as the full path would
        if i % 20 == 0:
            await asyncio.sleep(0.002)  # the event loop turns between bursts of calls
    assert dry == 0, dry


@pytest.mark.parametrize("store", ["redis", "in_process"])
async def test_a_busy_user_back_after_a_pause_finds_quota_on_the_fast_path(
    redis_helper, store
) -> None:
    """A user busy, then quiet for longer than a lease (1 s), then busy again: the relay's
    first call that finds no quota asks for the next lease itself, sized on the last one,
    so only that call takes the full path (the lease was regrown from two calls, a round
    trip at a time, the calls meanwhile sent to the full path: 5 of 600 here)."""
    redis = redis_helper if store == "redis" else RedisClient(RedisSettings())
    limiter = ApiLimiter(RateLimitSettings(api_requests=1_000_000, api_window=60), redis)

    async def burst(calls: int) -> int:
        dry = 0
        for i in range(calls):
            if not limiter.try_local("back"):
                dry += 1
                await limiter.acquire("back", ("user",))  # as the full path would
            if i % 20 == 0:
                await asyncio.sleep(0.002)  # the event loop turns between bursts of calls
        return dry

    await burst(600)  # the leases grow to the user's pace
    await asyncio.sleep(1.0)  # the last lease ends unspent
    assert await burst(600) <= 1


def test_a_refusal_says_one_retry_time_everywhere() -> None:
    """retry-after, x-ratelimit-reset and the message give the same whole second, RetryInfo
    rounded up (a 47.2 s wait is 48 everywhere, never 47: no client retries early)."""
    error = _refusal("requests", "api:user", 100, 47.2)
    trailers = dict(error.to_status().trailing_metadata)
    assert trailers["retry-after"] == trailers["x-ratelimit-reset"] == "48"
    assert "retry in 48 s" in error.message


async def test_redis_keeps_a_member_per_round_trip_and_the_exact_total(redis_helper) -> None:
    """2,000 calls of a busy user leave Redis a few dozen runs (one per round trip, not a
    member per call), and once its last lease has been settled the total counted is
    exactly the calls made: unspent reservations went back, spent ones stayed."""
    limiter = ApiLimiter(
        RateLimitSettings(api_requests=1_000_000, api_window=60, api_reserve_lease_ms=200),
        redis_helper,
    )
    for i in range(2000):
        if not limiter.try_local("runs"):
            await limiter.acquire("runs", ("user",))
        if i % 20 == 0:
            await asyncio.sleep(0.002)
    await asyncio.sleep(0.5)  # the last lease ends and is settled
    runs, _, counts = limiter._keys("runs")
    members = await redis_helper.client.zcard(runs)
    assert 1 <= members <= 100, members
    assert int(await redis_helper.client.hget(counts, "#")) == 2000
