"""Resilience primitives: circuit breaker (seed: 5 failures, 60 s open, half-open probe)."""
