"""dataplatform: PostgreSQL, Redis and Qdrant behind one internal gRPC API."""
