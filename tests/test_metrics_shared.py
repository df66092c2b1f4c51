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
