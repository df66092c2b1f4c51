"""The front door: the HTTP server side (site, limits) and the gate (keys, CORS, rate limits, client identity)."""
