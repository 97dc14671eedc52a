"""Gateway security tests: tokens, sessions, RBAC matrix, rate limits, caches."""
