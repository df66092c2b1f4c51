"""TLS on the listening side: `--listen ssl:...` serves HTTPS with the same routes."""

from __future__ import annotations

import datetime
import json

import pytest_twisted
from conftest import config_for
from OpenSSL.crypto import FILETYPE_PEM
from twisted.internet import reactor, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody

from olladmr.build import build


def self_signed(name: str = "localhost") -> ssl.PrivateCertificate:
    """
    A self-signed certificate for ``name``, made with ``cryptography`` (Twisted's
    ``KeyPair.selfSignedCert`` needs pyOpenSSL's ``X509Req``, which pyOpenSSL 26 removed).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return ssl.PrivateCertificate.loadPEM(key_pem + cert.public_bytes(serialization.Encoding.PEM))


@pytest_twisted.ensureDeferred
async def test_https_listener(tmp_path, fake):
    """A self-signed certificate on an ssl: endpoint: the OpenAI routes answer over HTTPS."""
    cert = self_signed()
    pem = tmp_path / "server.pem"
    pem.write_bytes(cert.dumpPEM())
    service = build(
        config_for(fake), reactor=reactor, listen=f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
    ).service
    service.startService()
    await service.serving
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert.dump(FILETYPE_PEM)))
        agent = Agent(reactor, contextFactory=policy, pool=pool)
        port = service.port.getHost().port
        response = await agent.request(b"GET", f"https://localhost:{port}/olla/dmr/engines/v1/models".encode())
        body = json.loads(await readBody(response))
        assert response.code == 200 and {m["id"] for m in body["data"]} == {"ai/smollm2", "ai/llama3.2"}
    finally:
        await service.stopService()
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_an_https_upstream_is_health_checked_and_proxied_streams_included(tmp_path, monkeypatch, daemon_factory):
    """
    An ``https://`` endpoint: the health checks (treq) and the proxy path's own
    connections (olladmr/proxy/wire.py over Twisted's TLS endpoint) verify the
    certificate against the platform's trust (here a test CA in SSL_CERT_FILE)
    and relay answers and streams unchanged.
    """
    from fakedmr import FakeDMR

    cert = self_signed()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert.dump(FILETYPE_PEM))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # what OpenSSL's default verify paths read
    secure = FakeDMR(name="secure")
    await secure.start(tls=ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original))
    try:
        assert secure.url.startswith("https://localhost:")
        daemon = await daemon_factory(config_for(secure))
        response, body = await daemon.post_json(
            "/olla/dmr/engines/v1/chat/completions", {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert response.code == 200 and json.loads(body)["object"] == "chat.completion"
        assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"secure"]
        response, body = await daemon.post_json(
            "/olla/dmr/engines/v1/chat/completions",
            {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        assert response.code == 200 and body.rstrip().endswith(b"data: [DONE]")
    finally:
        await secure.stop()
