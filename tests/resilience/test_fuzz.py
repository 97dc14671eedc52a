"""Property-based fuzzing: random request bytes, metadata and JWT-shaped strings through
the gateway to every public RPC, and random bytes to each back end's internal API.
Never INTERNAL/UNKNOWN, never a crash, never a hang."""

from __future__ import annotations

import string

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from gateway.h2 import request_error
from gateway.policies import method_table
from tests.conftest import bearer, login

pytestmark = pytest.mark.slow

METHODS = method_table()
PUBLIC = sorted(p for p, m in METHODS.items() if m.declared)
INTERNAL = sorted(p for p, m in METHODS.items() if m.package == "aiwfe.data.v1")
BACKEND_OF = {"aiwfe.cognitive.v1": "cognitive", "aiwfe.taskproc.v1": "taskproc",
              "aiwfe.data.v1": "dataplatform"}  # fmt: skip
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_header_chars = st.text(string.ascii_letters + string.digits + "-._~+/= ", max_size=300)


async def _call(channel: grpc.aio.Channel, path: str, payload: bytes, metadata) -> grpc.StatusCode:
    info = METHODS[path]
    try:
        if info.server_streaming:
            call = channel.unary_stream(path)(payload, metadata=metadata, timeout=10)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(path)(payload, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@FUZZ
@given(path=st.sampled_from(PUBLIC), payload=st.binary(max_size=1024))
async def test_random_request_bytes_through_gateway(suite, admin_token, path, payload) -> None:
    """Any bytes to any public RPC with a valid admin token answer a precise status."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        code = await _call(ch, path, payload, bearer(admin_token))
    assert code not in NEVER, (path, payload)
    assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, (path, payload)


@FUZZ
@given(
    path=st.sampled_from(PUBLIC),
    auth=st.one_of(
        _header_chars,
        st.builds(lambda t: f"Bearer {t}", _header_chars),
        st.builds(
            lambda a, b, c: f"Bearer {a}.{b}.{c}",
            st.text(string.ascii_letters + string.digits + "-_", max_size=80),
            st.text(string.ascii_letters + string.digits + "-_", max_size=200),
            st.text(string.ascii_letters + string.digits + "-_", max_size=80),
        ),
    ),
    extra=st.lists(
        st.tuples(st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20), _header_chars),
        max_size=5,
    ),
)
async def test_random_metadata_and_tokens(suite, path, auth, extra) -> None:
    """Garbage authorization values and random metadata never get past authentication or
    cause INTERNAL."""
    metadata = (*((k, v) for k, v in extra if not k.startswith("grpc-")), ("authorization", auth))
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        code = await _call(ch, path, b"", metadata)
    assert code not in NEVER
    if not METHODS[path].public:
        # A field HTTP/2 calls malformed (RFC 9113 §8.2, e.g. a value with a space at either
        # end) is refused by the gateway's relay before authentication: INVALID_ARGUMENT.
        fields = [(k.encode(), v.encode()) for k, v in metadata]
        malformed = request_error([(b":method", b"POST"), (b":scheme", b"http"),
                                   (b":path", path.encode()), *fields])  # fmt: skip
        expected = (
            grpc.StatusCode.INVALID_ARGUMENT if malformed else grpc.StatusCode.UNAUTHENTICATED
        )
        assert code is expected, (path, auth, extra)


@FUZZ
@given(
    path=st.sampled_from([*INTERNAL, *(p for p in PUBLIC if METHODS[p].package in BACKEND_OF)]),
    payload=st.binary(max_size=1024),
)
async def test_random_bytes_to_back_ends(suite, path, payload) -> None:
    """Each back end's own port, called with a valid internal identity, never answers INTERNAL."""
    identity = InternalIdentity.from_settings(suite.settings)
    metadata = ((IDENTITY_METADATA_KEY, identity.assertion(None, "fuzz")),)
    backend = BACKEND_OF[METHODS[path].package]
    async with grpc.aio.insecure_channel(suite.address(backend)) as ch:
        code = await _call(ch, path, payload, metadata)
    assert code not in NEVER, (path, payload)


@pytest.fixture
async def admin_token(suite) -> str:
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        return await login(ch)
