"""olladmr: an event-driven proxy for Docker Model Runner servers, on Twisted."""

__version__ = "0.1.0"
