"""TLS: the suite serves TLS when a certificate is configured, inter-service channels use
it too, plaintext clients are refused, and with mTLS a client without a certificate is
refused. Certificates are generated in the test."""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from typing import Any

import grpc
import pytest

from aiwfe.app.cli import check_health
from aiwfe.app.suite import start_suite
from aiwfe.runtime.config import ConfigError, load_settings
from aiwfe.sdk.channel import channel_credentials
from aiwfe.sdk.client import AsyncClient
from tests.conftest import ADMIN_PASSWORD
from tests.deploy.certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def tls_overrides(base: dict[str, Any], certs: Certs, mtls: bool) -> dict[str, Any]:
    overrides = copy.deepcopy(base)
    tls = {
        "cert_file": str(certs.server_cert),
        "key_file": str(certs.server_key),
        "ca_file": str(certs.ca),
    }
    if mtls:
        tls |= {
            "client_ca_file": str(certs.ca),
            "client_cert_file": str(certs.client_cert),
            "client_key_file": str(certs.client_key),
        }
    overrides["tls"] = tls
    return overrides


async def test_tls_client_succeeds_and_plaintext_fails(base_overrides, certs) -> None:
    """Over TLS a client logs in and embeds (gateway→cognitive→dataplatform over TLS too);
    a plaintext client cannot even reach the health service."""
    suite = await start_suite(tls_overrides(base_overrides, certs, mtls=False))
    try:
        gateway = suite.address("gateway")
        async with AsyncClient(gateway, ca_file=str(certs.ca), timeout=10) as client:
            await client.login("admin", ADMIN_PASSWORD)
            reply = await client.embed(["over tls"])
            assert reply.dimension == 768
        creds = channel_credentials(str(certs.ca))
        assert await check_health(gateway, "", 5, creds) == "SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await check_health(gateway, "", 2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with AsyncClient(gateway, timeout=2) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await plain.login("admin", ADMIN_PASSWORD)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await suite.stop()


async def test_mtls_requires_a_client_certificate(base_overrides, certs) -> None:
    """With client_ca_file every service requires a client certificate: the services' own
    channels present one (login reaches dataplatform), a client with one succeeds, a TLS
    client without one is refused."""
    suite = await start_suite(tls_overrides(base_overrides, certs, mtls=True))
    try:
        gateway = suite.address("gateway")
        async with AsyncClient(
            gateway,
            ca_file=str(certs.ca),
            cert_file=str(certs.client_cert),
            key_file=str(certs.client_key),
            timeout=10,
        ) as client:
            await client.login("admin", ADMIN_PASSWORD)
            assert (await client.embed(["over mtls"])).dimension == 768
            assert (await client.whoami()).username == "admin"
        async with AsyncClient(gateway, ca_file=str(certs.ca), timeout=2) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await no_cert.login("admin", ADMIN_PASSWORD)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The back ends require the certificate too, not only the gateway.
        with pytest.raises(grpc.aio.AioRpcError):
            await check_health(
                suite.address("dataplatform"), "", 2, channel_credentials(str(certs.ca))
            )
        both = channel_credentials(str(certs.ca), str(certs.client_cert), str(certs.client_key))
        assert await check_health(suite.address("dataplatform"), "", 5, both) == "SERVING"
    finally:
        await suite.stop()


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"cert_file": "/x.pem"}, "key_file"),
        ({"client_cert_file": "/x.pem"}, "client_key_file"),
        ({"client_ca_file": "/ca.pem"}, "client_ca_file"),
    ],
)
def test_incomplete_tls_config_names_the_key(tls, message) -> None:
    """A certificate without its key (or mTLS without a server cert) refuses to load."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, overrides={"tls": tls})
    assert "'tls'" in str(err.value) and message in str(err.value)


async def test_unreadable_certificate_is_a_config_error(base_overrides, certs, tmp_path) -> None:
    """A configured but missing certificate file fails start-up naming tls.cert_file."""
    overrides = copy.deepcopy(base_overrides)
    overrides["tls"] = {"cert_file": str(tmp_path / "no.pem"), "key_file": str(certs.server_key)}
    with pytest.raises(ConfigError) as err:
        await start_suite(overrides, only=("cognitive",))
    assert "tls.cert_file" in str(err.value)


async def test_cli_over_tls(base_overrides, certs, tmp_path) -> None:
    """`aiwfe health` and `aiwfe login`/`whoami` work with --ca-file against a TLS gateway;
    without it the CLI reports one UNAVAILABLE line."""
    suite = await start_suite(tls_overrides(base_overrides, certs, mtls=False))
    env = {
        **os.environ,
        "AIWFE_CREDENTIALS": str(tmp_path / "cred.json"),
        "AIWFE_PASSWORD": ADMIN_PASSWORD,
        "AIWFE_GATEWAY": suite.address("gateway"),
    }

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiwfe",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    try:
        assert (await cli("health", "--ca-file", str(certs.ca)))[:2] == (0, "SERVING\n")
        assert (await cli("login", "--ca-file", str(certs.ca)))[0] == 0
        code, out, _ = await cli("whoami", "--ca-file", str(certs.ca), "--json")
        assert code == 0 and '"username": "admin"' in out
        code, _, err = await cli("whoami", "--timeout", "2")
        assert code == 1 and err.startswith("aiwfe: UNAVAILABLE:") and err.count("\n") == 1
    finally:
        await suite.stop()
