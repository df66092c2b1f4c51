"""Shared fixtures: fake DMRs on real ports and the real olladmr service tree."""

from __future__ import annotations

import os
import sys
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

sys.path.insert(0, os.path.dirname(__file__))

from fakedmr import FakeDMR  # noqa: E402

from olladmr import build as assembly  # noqa: E402
from olladmr.config import parse_config  # noqa: E402


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait (polling the reactor every 10 ms) until ``predicate()`` holds, or fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


async def within(d: Deferred[Any], timeout: float, what: str = "event") -> Any:
    """Await ``d`` but fail the test if it takes longer than ``timeout`` seconds."""
    d.addTimeout(timeout, reactor)
    try:
        return await d
    except Exception as exc:
        if type(exc).__name__ == "TimeoutError":
            raise AssertionError(f"{what} did not happen within {timeout}s") from None
        raise


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[FakeDMR]:
    dmr = FakeDMR(name="fake-a")
    await dmr.start()
    yield dmr
    await dmr.stop()


@pytest_twisted.async_yield_fixture
async def fakes() -> AsyncIterator[list[FakeDMR]]:
    dmrs = [FakeDMR(name=f"fake-{i}") for i in range(3)]
    for dmr in dmrs:
        await dmr.start()
    yield dmrs
    for dmr in dmrs:
        await dmr.stop()


class Daemon:
    """A running olladmr (every part of it, as built by olladmr.build) on 127.0.0.1:<random port>, plus HTTP helpers."""

    def __init__(self, parts: assembly.Daemon) -> None:
        self.parts = parts
        self.service = parts.service
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    @property
    def port(self) -> int:
        return self.service.port.getHost().port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[Any, bytes]:
        from twisted.web.client import FileBodyProducer
        import io

        hdrs = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        response = await self.agent.request(method.encode(), (self.base + path).encode(), hdrs, producer)
        data = await readBody(response)
        return response, data

    async def post_json(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        import json

        hdrs = {"content-type": "application/json", **(headers or {})}
        return await self.request("POST", path, json.dumps(payload).encode(), hdrs)

    def openai(self, prefix: str = "/olla/dmr/engines/v1") -> Any:
        import openai

        return openai.OpenAI(base_url=self.base + prefix, api_key="not-needed", max_retries=0, timeout=20)


async def raw_request(url: str, method: str = "GET", payload: Any = None) -> tuple[Any, bytes]:
    """One request on a connection of its own (a JSON ``payload``, if any): the response and its whole body."""
    import io
    import json

    from twisted.web.client import FileBodyProducer

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    body = FileBodyProducer(io.BytesIO(json.dumps(payload).encode())) if payload is not None else None
    response = await agent.request(method.encode(), url.encode(), Headers({b"content-type": [b"application/json"]}),
                                   body)
    return response, await readBody(response)


def config_for(*fakes: FakeDMR, **sections: Any) -> Any:
    """A Config with one endpoint per fake (names fake-0.., priorities descending)."""
    endpoints = []
    for index, dmr in enumerate(fakes):
        ep = {"url": dmr.url, "name": dmr.name, "priority": 100 - index, "check_interval": "10s", "check_timeout": "2s"}
        ep.update(sections.pop(f"endpoint{index}", {}))
        endpoints.append(ep)
    document = {"server": {"host": "127.0.0.1", "port": 0}, "endpoints": endpoints}
    for key, value in sections.items():
        document.setdefault(key, {}).update(value)
    return parse_config(document, "test-config")


@pytest_twisted.async_yield_fixture
async def daemon_factory() -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    started: list[Daemon] = []

    async def make(config: Any) -> Daemon:
        parts = assembly.build(config, reactor=reactor, listen="tcp:0:interface=127.0.0.1")
        parts.service.startService()
        await parts.service.serving
        daemon = Daemon(parts)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        await daemon.service.stopService()
        await daemon.pool.closeCachedConnections()


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """Run a blocking client call (the openai SDK) off the reactor thread."""
    from twisted.internet import threads

    return threads.deferToThread(fn, *args, **kwargs)

