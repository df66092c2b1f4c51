"""``--workers`` metrics: increments a turn makes reach the shared files once, at the turn's end."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, values
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.internet.task import Clock

from olladmr.ops.metrics import MULTIPROCESS_ENV, batched_values


def shared_total(directory: Path, name: str) -> float:
    for family in MultiProcessCollector(None, path=str(directory)).collect():
        if family.name == name:
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


def test_a_turns_increments_are_written_once_at_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    clock = Clock()
    monkeypatch.setattr(values, "ValueClass", batched_values(values.MultiProcessValue(), clock))
    counter = Counter("shared_things", "things", ["kind"], registry=CollectorRegistry())
    child = counter.labels("a")
    child.inc()
    child.inc(2)
    counter.labels("b").inc(5)
    assert shared_total(tmp_path, "shared_things") == 0  # not written yet: the turn is not over
    assert child._value.get() == 3  # but this process counts them already
    assert len(clock.getDelayedCalls()) == 1  # one flush for the whole turn
    clock.advance(0)
    assert shared_total(tmp_path, "shared_things") == 8
    child.inc()
    clock.advance(0)
    assert shared_total(tmp_path, "shared_things") == 9 and clock.getDelayedCalls() == []


def test_an_exchange_adds_only_the_series_it_counted_in() -> None:
    """A rejected request (no endpoint, no response) makes no byte, first-byte or token series; a served one does."""
    from prometheus_client.parser import text_string_to_metric_families

    from olladmr.config import parse_config
    from olladmr.fleet.state import Fleet
    from olladmr.ops.metrics import ReactorThreadValue, Metrics
    from olladmr.proxy.record import REJECTED, ExchangeRecord

    clock = Clock()
    fleet = Fleet(parse_config({"endpoints": [{"url": "http://a:1", "name": "a"}]}, "t"), clock)
    metrics = Metrics(fleet, clock, lambda: 0)

    def series() -> dict[str, float]:
        found = {}
        for family in text_string_to_metric_families(metrics.render().decode()):
            for sample in family.samples:
                if sample.name.startswith(("olladmr_upstream_response_bytes", "olladmr_time_to_first_byte_seconds_count",
                                           "olladmr_tokens_total", "olladmr_requests_total")):
                    found[sample.name + repr(sorted(sample.labels.items()))] = sample.value
        return found

    metrics.exchange_done(ExchangeRecord("1", "POST", "/x", "chat/completions", "c", "ai/x", status=404,
                                         outcome=REJECTED, ended=0.1))
    assert [name for name in series() if not name.startswith("olladmr_requests_total")] == []
    metrics.exchange_done(ExchangeRecord("2", "POST", "/x", "chat/completions", "c", "ai/x", endpoint="a", status=200,
                                         bytes_sent=10, headers_at=0.05, ended=0.1,
                                         usage={"prompt_tokens": 3, "completion_tokens": 4}))
    got = series()
    assert sum(v for k, v in got.items() if k.startswith("olladmr_upstream_response_bytes_total")) == 10
    assert sum(v for k, v in got.items() if k.startswith("olladmr_time_to_first_byte_seconds_count")) == 1
    assert sum(v for k, v in got.items() if k.startswith("olladmr_tokens_total")) == 7
    assert sum(v for k, v in got.items() if k.startswith("olladmr_requests_total")) == 2
    value = ReactorThreadValue("counter", "n", "n", (), (), "h")
    value.inc(2)
    value.inc(0.5)
    assert value.get() == 2.5
    value.set(1)
    assert value.get() == 1.0
