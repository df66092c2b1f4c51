"""twistd plugin: ``twistd -n olladmr``.  The code lives in olladmr.tap (imported lazily)."""

from twisted.application.service import ServiceMaker

olladmr = ServiceMaker(
    "olladmr",
    "olladmr.tap",
    "OpenAI-compatible proxy for Docker Model Runner servers",
    "olladmr",
)
