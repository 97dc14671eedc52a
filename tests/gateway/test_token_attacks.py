"""Bad tokens and attacks: every one is UNAUTHENTICATED, spoofed internal headers are
ignored, and keys rotate by kid with pinned algorithms (JWKS for RS256/EdDSA)."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import time
import uuid

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from tests.conftest import bearer, login
from tests.gateway.conftest import gateway_overrides


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra) -> dict:
    now = int(time.time())
    base = {
        "sub": str(uuid.uuid4()),
        "name": "mallory",
        "roles": ["admin"],
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "iss": "aiwfe",
        "aud": "aiwfe-api",
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(secret: str | bytes, payload: dict, header: dict) -> str:
    """A JWT built by hand (PyJWT refuses some of the malicious combinations)."""
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    key = secret.encode() if isinstance(secret, str) else secret
    sig = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(sig)}"


async def whoami(channel: grpc.aio.Channel, metadata) -> grpc.StatusCode:
    try:
        await auth_grpc.AuthServiceStub(channel).WhoAmI(
            auth_pb.WhoAmIRequest(), metadata=metadata, timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _cases(secret: str) -> dict[str, str]:
    good = jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "k1"})
    head, body, sig = good.split(".")
    tampered_body = _b64(json.dumps(claims(roles=["admin", "root"])).encode())
    now = int(time.time())
    none_head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    none_kid = _b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
    return {
        "forged (another secret)": jwt.encode(claims(), "x" * 40, headers={"kid": "k1"}),
        "tampered payload": f"{head}.{tampered_body}.{sig}",
        "tampered signature": f"{head}.{body}.{sig[:-4]}AAAA",
        "expired": jwt.encode(
            claims(iat=now - 7200, exp=now - 3600), secret, headers={"kid": "k1"}
        ),
        "not yet valid (nbf)": jwt.encode(claims(nbf=now + 3600), secret, headers={"kid": "k1"}),
        "not yet valid (iat)": jwt.encode(
            claims(iat=now + 3600, exp=now + 7200), secret, headers={"kid": "k1"}
        ),
        "wrong audience": jwt.encode(claims(aud="someone-else"), secret, headers={"kid": "k1"}),
        "wrong issuer": jwt.encode(claims(iss="evil"), secret, headers={"kid": "k1"}),
        "missing jti": jwt.encode(claims(jti=None), secret, headers={"kid": "k1"}),
        "missing exp": jwt.encode(claims(exp=None), secret, headers={"kid": "k1"}),
        "alg none": f"{none_head}.{body}.",
        "alg none with kid": f"{none_kid}.{body}.",
        "HS512 on an HS256 key": jwt.encode(
            claims(),
            secret + "-but-longer-for-hs512-keys-of-64-bytes!!",
            algorithm="HS512",
            headers={"kid": "k1"},
        ),
        "unknown kid": jwt.encode(claims(), secret, headers={"kid": "nope"}),
        "roles not a list": jwt.encode(claims(roles="admin"), secret, headers={"kid": "k1"}),
        "oversized": "a" * 5000,
        "garbage": "not.a.jwt",
        "garbage base64": "eyJhbGciOi.eyJzdWIi.c2ln",
        "empty segments": "..",
    }


async def test_every_bad_token_is_unauthenticated(gw) -> None:
    """Forged, tampered, expired, not-yet-valid, foreign, alg none, wrong-key, oversized and
    garbage tokens all get UNAUTHENTICATED, and a good token still works."""
    secret = gw.suite.settings.authentication.jwt.secret_key
    results = {
        name: await whoami(gw.channel, bearer(token)) for name, token in _cases(secret).items()
    }
    assert results == {name: grpc.StatusCode.UNAUTHENTICATED for name in results}
    assert await whoami(gw.channel, bearer(gw.admin_token)) == grpc.StatusCode.OK


async def test_spoofed_identity_headers_are_ignored(gw) -> None:
    """Client-sent x-aiwfe-* headers (even a valid internal assertion) grant nothing."""
    identity = InternalIdentity.from_settings(gw.suite.settings)
    spoof = identity.assertion(None, "gateway")
    metadata = ((IDENTITY_METADATA_KEY, spoof), ("x-aiwfe-user", "admin"))
    assert await whoami(gw.channel, metadata) == grpc.StatusCode.UNAUTHENTICATED
    name = await gw.create_user(["readonly"], "spoof")
    token = (await gw.login(name)).access_token
    me = await gw.auth.WhoAmI(
        auth_pb.WhoAmIRequest(), metadata=(*bearer(token), *metadata), timeout=5
    )
    assert (me.username, list(me.roles)) == (name, ["readonly"])


@pytest.fixture
async def rotated(base_overrides, redis_url, tmp_path):
    """A suite whose default key signs, with an older HS256 key and a JWKS (RSA + Ed25519)."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())),
             "kid": "rsa1", "alg": "RS256", "use": "sig"},
            {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ed_key.public_key())),
             "kid": "ed1", "alg": "EdDSA", "use": "sig"},
        ]
    }  # fmt: skip
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    old_secret = "an-older-rotated-out-secret-of-40-bytes!"
    overrides = gateway_overrides(base_overrides, redis_url)
    overrides = copy.deepcopy(overrides)
    overrides["authentication"]["jwt"].update(
        {"keys": [{"kid": "old", "secret_key": old_secret}], "jwks_file": str(path)}
    )
    suite = await start_suite(overrides, only=("dataplatform", "gateway"))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            yield channel, old_secret, rsa_key, ed_key
    finally:
        await suite.stop()


async def test_rotation_and_pinned_algorithms(rotated) -> None:
    """Tokens of every configured kid verify with that key's algorithm only: an old HS key,
    RS256 and EdDSA from the JWKS; HS-signed tokens naming an RSA kid are refused."""
    channel, old_secret, rsa_key, ed_key = rotated
    issued = await login(channel)
    assert jwt.get_unverified_header(issued)["kid"] == "k1"
    ok = grpc.StatusCode.OK
    unauth = grpc.StatusCode.UNAUTHENTICATED
    rsa_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cases = {
        "old kid": (jwt.encode(claims(), old_secret, headers={"kid": "old"}), ok),
        "rs256": (jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa1"}), ok),
        "eddsa": (jwt.encode(claims(), ed_key, algorithm="EdDSA", headers={"kid": "ed1"}), ok),
        "HS256 signed with the RSA public key": (
            hs_token(rsa_pem, claims(), {"alg": "HS256", "kid": "rsa1"}),
            unauth,
        ),
        "RS256 header on the HS kid": (
            jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "old"}),
            unauth,
        ),
        "EdDSA key under the RSA kid": (
            jwt.encode(claims(), ed_key, algorithm="EdDSA", headers={"kid": "rsa1"}),
            unauth,
        ),
        "old secret under the new kid": (
            jwt.encode(claims(), old_secret, headers={"kid": "k1"}),
            unauth,
        ),
    }
    results = {name: await whoami(channel, bearer(tok)) for name, (tok, _) in cases.items()}
    assert results == {name: want for name, (_, want) in cases.items()}
    assert await whoami(channel, bearer(issued)) == ok
