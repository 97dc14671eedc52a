"""Performance harness for the aiwfe suite: run `python -m benchmarks --help`.

The suite runs in a server process of its own (`benchmarks.servers`); the harness process
generates the load with grpc.aio and reads the server's CPU time from /proc.
"""
