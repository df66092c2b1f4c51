"""The fleet: endpoint state, breakers, balancing, model-aware routing, health checks and the model catalogue."""
