"""TLS on the listening side: `--listen ssl:...` serves HTTPS with the same routes."""

from __future__ import annotations

import json

import pytest_twisted
from conftest import config_for
from OpenSSL.crypto import FILETYPE_PEM
from twisted.internet import reactor, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody

from olladmr.build import build


@pytest_twisted.ensureDeferred
async def test_https_listener(tmp_path, fake):
    """A self-signed certificate on an ssl: endpoint: the OpenAI routes answer over HTTPS."""
    key = ssl.KeyPair.generate(size=2048)
    cert = key.selfSignedCert(1, CN="localhost")
    pem = tmp_path / "server.pem"
    pem.write_bytes(key.dump(FILETYPE_PEM) + cert.dumpPEM())
    service = build(
        config_for(fake), reactor=reactor, listen=f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
    ).service
    service.startService()
    await service.serving
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert.dumpPEM()))
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

    key = ssl.KeyPair.generate(size=2048)
    cert = key.selfSignedCert(1, CN="localhost")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert.dumpPEM())
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # what OpenSSL's default verify paths read
    secure = FakeDMR(name="secure")
    await secure.start(tls=ssl.CertificateOptions(privateKey=key.original, certificate=cert.original))
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
