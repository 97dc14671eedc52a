"""gateway: the suite's one front door (JWT, RBAC, rate limits) and byte-level proxy."""
