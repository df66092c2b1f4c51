"""``olladmr.lean``: no pyOpenSSL in a daemon whose configuration needs no TLS, and a reload that would need it refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from olladmr import lean
from olladmr.config import ConfigError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, sys
from olladmr.tap import Options, makeService
path = sys.argv[1]
opts = Options(); opts.parseOptions(["--config", path] + sys.argv[2:])
service = makeService(opts)
from olladmr.lean import tls_available
out = {"openssl": "OpenSSL" in sys.modules, "cryptography": "cryptography" in sys.modules, "tls": tls_available()}
print(json.dumps(out))
"""


def config(*urls: str, **server: object) -> object:
    return parse_config({"server": server, "endpoints": [{"url": u} for u in urls]}, "t.yaml")


def test_needs_tls_reads_endpoint_urls_and_the_listener() -> None:
    assert not lean.needs_tls(config("http://a:1", "http://b:2"))
    assert lean.needs_tls(config("http://a:1", "https://b:443"))
    assert lean.needs_tls(config("http://a:1"), "ssl:8443:privateKey=k.pem:certKey=c.pem")
    assert not lean.needs_tls(config("http://a:1"), "tcp:40114:interface=127.0.0.1")
    assert not lean.needs_tls(config("http://a:1"), "unix:/run/olladmr.sock")


def test_a_reload_that_needs_tls_is_refused_in_a_process_without_it(monkeypatch) -> None:
    plain, secure = config("http://a:1"), config("http://a:1", "https://b:443")
    monkeypatch.setattr(lean, "tls_available", lambda: False)
    assert lean.check_tls(plain, "tcp:1") is plain
    with pytest.raises(ConfigError) as caught:
        lean.check_tls(secure, "tcp:1")
    assert str(caught.value).startswith("t.yaml: endpoints[1].url: needs TLS, and this olladmr started without it")
    monkeypatch.setattr(lean, "tls_available", lambda: True)
    assert lean.check_tls(secure, "tcp:1") is secure


def _probe(tmp_path, *urls: str) -> dict[str, bool]:
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 0}\nendpoints:\n" + "".join(f"  - {{url: '{u}'}}\n" for u in urls))
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_makeservice_loads_no_openssl_unless_tls_is_configured(tmp_path) -> None:
    """A fresh process (as under twistd): plain config -> no pyOpenSSL, no cryptography; an https endpoint -> TLS."""
    assert _probe(tmp_path, "http://127.0.0.1:9") == {"openssl": False, "cryptography": False, "tls": False}
    assert _probe(tmp_path, "http://127.0.0.1:9", "https://127.0.0.2:9") == {
        "openssl": True, "cryptography": True, "tls": True,
    }
