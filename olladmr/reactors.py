"""
The reactor olladmr runs on, as one type.

Twisted describes a reactor by many interfaces; olladmr's parts use time,
the core (start and stop), TCP, processes (``--workers``), adopted sockets
and calls from threads (signals).  :class:`IReactor` is all of them at
once, so the composition root and the service say what they are given
instead of ``Any``; parts that need only time take ``IReactorTime`` (a
``task.Clock`` in tests).
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
)


class IReactor(IReactorTime, IReactorCore, IReactorTCP, IReactorProcess, IReactorSocket, IReactorFromThreads):
    """The interfaces of the running reactor that olladmr uses."""
