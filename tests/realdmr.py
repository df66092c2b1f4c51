"""
The real DMR bundle (``../shared/tools/realdmr/dmr``: docker/model-runner built from source, llama.cpp, the
models ``ai/tiny``, ``ai/tiny-embed`` and ``ai/small``) for slow tests: where it is, and :class:`RealDMRs`, which
starts some on free ports with their state under a directory of the test's and stops and purges them.
Not a test module itself.
"""

from __future__ import annotations

import os
import socket
import subprocess

from twisted.internet import threads

REALDMR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools", "realdmr", "dmr"))
START = os.path.join(REALDMR, "start.sh")
AVAILABLE = os.access(START, os.X_OK)
MISSING = f"no real DMR bundle at {REALDMR}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RealDMRs:
    """Real DMRs from the bundle on ``ports`` (free ones by default), their state under ``statedir``."""

    def __init__(self, count: int, statedir: str, ports: list[int] | None = None) -> None:
        self.ports = ports or [free_port() for _ in range(count)]
        self.env = {**os.environ, "TMPDIR": statedir}
        self.started: list[int] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def script(self, name: str, *args: str) -> None:
        subprocess.run(["bash", os.path.join(REALDMR, name), *args], env=self.env, check=True, timeout=180,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def start(self) -> None:
        for port in self.ports:
            self.started.append(port)
            await threads.deferToThread(self.script, "start.sh", str(port))

    async def stop(self) -> None:
        for port in self.started:
            await threads.deferToThread(self.script, "stop.sh", str(port), "--purge")
        self.started.clear()
