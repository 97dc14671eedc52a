"""The app: the CLI, `aiwfe up` (launcher, embedded PostgreSQL/Redis) and the suite
composition; the only code that imports the services."""
