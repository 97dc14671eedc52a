"""aiwfe shared runtime: config, serve(), errors, identity, telemetry, generated stubs."""
