"""Deterministic multi-server simulations (one simulated clock, no sockets)."""
