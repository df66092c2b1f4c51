"""The real `twistd -n olladmr` process: plugin discovery, one-line config errors, serving, clean exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from conftest import in_thread, within
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OLLA_CONFIG_FILE", None)
    return env


def test_plugin_is_discoverable():
    """twistd lists the olladmr plugin (tapname `olladmr`)."""
    out = subprocess.run(TWISTD + ["--help"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert "olladmr" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "content,expected",
    [
        ("endpoints:\n  - {url: 'http://a:1', check_interval: ten}\n", ': endpoints[0].check_interval: expected a duration such as "10s", got "ten"'),
        ("server: {port: 1\n", ": line 2 column 1: invalid YAML"),
        (None, ": file not found"),
    ],
)
def test_config_errors_stop_twistd_with_one_line(tmp_path, content, expected):
    """A bad config stops the daemon before it listens: exit 1, one line naming file/key/problem, no traceback."""
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    out = subprocess.run(
        TWISTD + ["-n", "--pidfile=", "olladmr", "--config", str(path)],
        capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=60,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines == [f"{path}{expected}"] or (len(lines) == 1 and lines[0].startswith(str(path)) and expected in lines[0])
    assert "Traceback" not in out.stderr + out.stdout


class _Watcher(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[None] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"listening on" in self.output and not self.listening.called:
            self.listening.callback(None)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


async def worker_requests(port: int, pid: int) -> int:
    """The requests process ``pid`` sent upstream itself (its endpoints' own counters), asked until it answers."""
    import json

    from twisted.web.client import Agent, HTTPConnectionPool, readBody

    for _ in range(400):
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        agent = Agent(reactor, pool=pool)  # one kept-alive connection: both answers come from one process
        try:
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/internal/process".encode())
            answered = json.loads(await readBody(response)).get("pid")
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/internal/status/endpoints".encode())
            body = json.loads(await readBody(response))
        finally:
            await pool.closeCachedConnections()
        if answered == pid:
            return sum(ep["request_count"] for ep in body["endpoints"])
    raise AssertionError(f"process {pid} never answered")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_twistd_serves_then_exits_cleanly_on_sigterm(tmp_path, fake):
    """`twistd -n olladmr --listen ...` serves OpenAI SDK requests and exits 0 on SIGTERM."""
    import openai

    port = _free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"endpoints:\n  - {{url: '{fake.url}', name: box, check_interval: 1s}}\n")
    watcher = _Watcher()
    process = reactor.spawnProcess(
        watcher, sys.executable,
        TWISTD + ["-n", "--pidfile=", "olladmr", "--config", str(cfg), "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=_env(), path=str(tmp_path),
    )
    try:
        await within(watcher.listening, 30, "the daemon to listen")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/olla/dmr/engines/v1", api_key="x", max_retries=0)
        reply = await in_thread(client.chat.completions.create, model="smollm2", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hello, world!"
    finally:
        if process.pid:
            process.signalProcess("TERM")
    code = await within(watcher.ended, 30, "the daemon to exit")
    assert code == 0, watcher.output.decode()
    assert b"Traceback" not in watcher.output


def test_systemd_unit_verifies():
    """contrib/systemd/olladmr.service passes `systemd-analyze verify` (when the tool exists)."""
    import shutil

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    unit = os.path.join(ROOT, "contrib", "systemd", "olladmr.service")
    text = open(unit).read()
    for line in ("Type=simple", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "NoNewPrivileges=true"):
        assert line in text
    out = subprocess.run([tool, "verify", unit], capture_output=True, text=True, timeout=60)
    problems = [l for l in out.stderr.splitlines() if "olladmr.service" in l and "Command /opt/olladmr" not in l
                and "User=" not in l and "Failed to " not in l]
    assert problems == [], out.stderr


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_workers_share_the_socket_and_follow_signals(tmp_path, fake):
    """--workers 2: two processes answer on one port; SIGHUP reloads both; SIGTERM stops both, exit 0."""
    import io
    import json

    from conftest import eventually
    from twisted.internet import task
    from prometheus_client.parser import text_string_to_metric_families
    from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers

    port = _free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"endpoints:\n  - {{url: '{fake.url}', name: box, check_interval: 1s}}\n")
    watcher = _Watcher()
    process = reactor.spawnProcess(
        watcher, sys.executable,
        TWISTD + ["-n", "--pidfile=", "olladmr", "--config", str(cfg), "--workers", "2",
                  "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=_env(), path=str(tmp_path),
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)
    pids: set[int] = set()
    try:
        await eventually(lambda: watcher.output.count(b"listening on") >= 2, 30, "master and worker to listen")

        async def ask() -> None:
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/internal/status".encode())
            pids.add(json.loads(await readBody(response))["pid"])

        for _ in range(200):
            await ask()
            if len(pids) == 2:
                break
        assert len(pids) == 2

        # the traffic of both processes in one scrape (and in /internal/status) of either
        body = json.dumps({"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}).encode()
        sent = 0
        served: list[int] = []
        while sent < 400:  # (which process accepts a connection is the kernel's choice: until both served some)
            for _ in range(20):
                response = await agent.request(
                    b"POST", f"http://127.0.0.1:{port}/olla/dmr/engines/v1/chat/completions".encode(),
                    Headers({b"content-type": [b"application/json"]}), FileBodyProducer(io.BytesIO(body)),
                )
                assert response.code == 200
                await readBody(response)
                sent += 1
            served = [await worker_requests(port, pid) for pid in sorted(pids)]
            if all(served):
                break
        totals: dict[int, int] = {}  # pid -> the request total its /internal/status reports
        for _ in range(200):
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/internal/status".encode())
            status = json.loads(await readBody(response))
            totals[status["pid"]] = status["requests"]["total"]
            if len(totals) == 2:
                break
        scrapes = []
        for _ in range(20):
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/internal/metrics".encode())
            text = (await readBody(response)).decode()
            scrapes.append(sum(
                sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == "olladmr_requests_total"
            ))
        assert scrapes == [sent] * 20, scrapes
        assert sorted(totals.values()) == [sent, sent], totals
        assert sorted(totals) == sorted(pids)
        assert sum(served) == sent and all(served), served  # both served some: the sums are of two processes

        # health checks are the master's alone (the worker adopts them): one check a second, not two
        def checks() -> int:
            return sum(1 for r in fake.requests if r.method == "GET" and r.uri.startswith("/engines/v1/models"))

        before, started = checks(), reactor.seconds()
        await task.deferLater(reactor, 4.0, lambda: None)  # a measurement window, not a synchronisation
        window = reactor.seconds() - started
        assert checks() - before <= window + 1.5, (checks() - before, window)
        process.signalProcess("HUP")
        await eventually(lambda: watcher.output.count(b"reloaded ") == 2, 10, "both processes to reload")
        process.signalProcess("TERM")
        code = await within(watcher.ended, 30, "the daemon to exit")
    finally:
        if not watcher.ended.called:
            process.signalProcess("KILL")
    assert code == 0, watcher.output.decode()
    assert watcher.output.count(b"Server Shut Down") == 2
    assert b"Traceback" not in watcher.output
    await pool.closeCachedConnections()


# -- --check (like nginx -t)


def test_check_reports_ok_with_the_endpoint_names(tmp_path, monkeypatch):
    """``check()`` validates as start-up does: the file and its endpoints, or the one-line error; defaults too."""
    from olladmr.tap import check

    good = tmp_path / "good.yaml"
    good.write_text("endpoints:\n  - {name: a, url: 'http://a:1'}\n  - {name: b, url: 'http://b:1'}\n")
    assert check({"config": str(good)}, {}) == (0, f"{good}: ok (2 endpoints: a, b)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints:\n  - {url: 'http://a:1', check_interval: ten}\n")
    assert check({"config": str(bad)}, {}) == (
        1, f'{bad}: endpoints[0].check_interval: expected a duration such as "10s", got "ten"'
    )
    assert check({"config": None}, {"OLLA_CONFIG_FILE": str(good)})[1].startswith(f"{good}: ok")
    monkeypatch.chdir(tmp_path)
    if not os.path.exists("/etc/olladmr/config.yaml"):
        assert check({"config": None}, {}) == (0, "built-in defaults: ok (1 endpoint: local-dmr)")
    code, line = check({"config": str(good), "listen": "nonsense:1"}, {})
    assert code == 1 and line.startswith("--listen nonsense:1: not a valid Twisted endpoint description")


@pytest.mark.slow
def test_twistd_check_validates_without_listening_contacting_or_writing(tmp_path):
    """``twistd olladmr --check``: exit 0 and ``FILE: ok (...)``, or exit 1 and the one line; no pid file, no request."""
    with socket.socket() as upstream:  # an "endpoint" that must never be contacted
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(8)
        upstream.setblocking(False)
        url = f"http://127.0.0.1:{upstream.getsockname()[1]}"
        good = tmp_path / "good.yaml"
        good.write_text(f"endpoints:\n  - {{name: gpu-1, url: '{url}'}}\n")
        out = subprocess.run(TWISTD + ["olladmr", "--config", str(good), "--check"],
                             capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=60)
        assert (out.returncode, out.stdout, out.stderr) == (0, f"{good}: ok (1 endpoint: gpu-1)\n", "")
        with pytest.raises(BlockingIOError):
            upstream.accept()  # nobody connected
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 1\n")
    out = subprocess.run(TWISTD + ["olladmr", "--config", str(bad), "--check"],
                         capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{bad}: line 2 column 1: invalid YAML"), lines
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml", "good.yaml"]  # no twistd.pid, no twistd.log


def test_workers_option_takes_a_count_or_auto():
    """``--workers 3`` is 3, ``--workers auto`` one per usable CPU; zero or words are usage errors."""
    from twisted.python import usage

    from olladmr.tap import Options

    def parsed(value: str) -> int:
        options = Options()
        options.parseOptions(["--workers", value])
        return options["workers"]

    assert parsed("3") == 3
    assert parsed("auto") == parsed("AUTO") == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "many"):
        with pytest.raises(usage.UsageError):
            parsed(bad)
    defaults = Options()
    defaults.parseOptions([])
    assert defaults["workers"] == 1
