"""Resilience primitives: circuit breaker (seed: 5 failures, 60 s open at most; health-probed)."""
