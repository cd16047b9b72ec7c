"""Internal TLS on the hops the tests run exactly as deployed (router -> region, region -> region): regions
serve HTTPS only, clients verify them with the internal CA, and nothing else gets through."""

from __future__ import annotations

import asyncio
import datetime
import ssl

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.api.upstreams import NotConnected, Upstreams
from app.local.processes import ServiceProcess
from app.local.tls import ensure_local_tls
from app.security.tls import client_context
from tests.e2e.conftest import ROUTER_REGION, RouterApi, StartRouter
from tests.helpers import HTTP_TIMEOUT_S, new_client_id, poll_until
from tests.keys import SessionKeys
from tests.tls import session_tls


def test_every_region_serves_https_and_the_session_router_is_given_https_urls(
    region_services: dict[str, ServiceProcess], region_urls: dict[str, str]
) -> None:
    assert all(service.tls is not None for service in region_services.values())
    assert all(url.startswith("https://127.0.0.1:") for url in region_urls.values()), region_urls


async def test_a_region_refuses_plaintext_http_on_its_port(region_services: dict[str, ServiceProcess]) -> None:
    service = region_services[ROUTER_REGION]
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
        with pytest.raises(httpx.TransportError):
            await http.get(f"http://127.0.0.1:{service.port}/healthz")
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, verify=service.verify) as http:
        assert (await http.get(service.url + "/healthz")).status_code == 200


async def test_a_client_without_the_internal_ca_cannot_verify_a_region(
    region_services: dict[str, ServiceProcess], tmp_path
) -> None:
    url = region_services[ROUTER_REGION].url + "/healthz"
    other_ca = ensure_local_tls(tmp_path / "other").ca_file
    for verify in (client_context(None), client_context(other_ca)):  # the system store; another CA
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, verify=verify) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(url)


async def test_a_router_that_does_not_trust_the_regions_ca_sends_them_nothing(
    start_router: StartRouter, keys: SessionKeys, tmp_path
) -> None:
    other_ca = ensure_local_tls(tmp_path / "other").ca_file
    router = start_router("router-wrong-ca", env={"TXROUTE_INTERNAL_CA_FILE": str(other_ca),
                                                   "TXROUTE_SHARDMAP_REFRESH_PERIOD_S": "0"})
    async with httpx.AsyncClient(base_url=router.url, timeout=HTTP_TIMEOUT_S) as http:
        ready = (await http.get("/readyz")).json()
        assert ready["regions"] and not any(ready["regions"].values()), ready
        client = new_client_id("tls")
        opened = await RouterApi(http, client, keys.client_token(client)).open_account(region=ROUTER_REGION)
    assert opened.status_code == 503 and opened.json()["code"] == "region_unavailable", opened.text


async def test_the_public_path_and_a_cross_region_saga_work_over_internal_tls(client_api: RouterApi) -> None:
    source = (await client_api.open_account(region="eu-west-1")).json()["id"]
    destination = (await client_api.open_account(region="us-east-1")).json()["id"]
    assert (await client_api.deposit(source, 500)).status_code == 201
    moved = await client_api.transfer(source, destination, 200)
    assert moved.status_code in (201, 202), moved.text  # posted on the fast path, or pending for the relay

    async def credited() -> bool:
        return bool((await client_api.account(destination)).json()["balance"] == 200)

    await poll_until(credited, what="the saga's credit in us-east-1 (eu-west-1 -> us-east-1 over TLS)")


async def test_the_routers_and_relays_client_checks_the_name_not_only_the_ca(tmp_path) -> None:
    """`Upstreams` (the router's forwarding and the saga relay) refuses a certificate the internal CA signed
    for another name: CERT_REQUIRED alone would accept it. The same server with the region's certificate is
    reached, so the refusal is the name check."""
    tls = session_tls()
    ca = x509.load_pem_x509_certificate(tls.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(tls.ca_key_file.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    elsewhere = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere.invalid")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("elsewhere.invalid")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(elsewhere.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    for cert_file, key_file, reached in ((tmp_path / "cert.pem", tmp_path / "key.pem", False),
                                         (tls.cert_file, tls.key_file, True)):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        upstreams = Upstreams({"peer": f"https://127.0.0.1:{port}"}, tls=client_context(tls.ca_file))
        await upstreams.open()
        try:
            if reached:
                assert (await upstreams.send("peer", "GET", "/healthz", headers={}, body=None)).status == 200
            else:
                with pytest.raises(NotConnected):
                    await upstreams.send("peer", "GET", "/healthz", headers={}, body=None)
        finally:
            await upstreams.close()
            server.close()
            await server.wait_closed()
