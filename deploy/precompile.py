"""Bytecode only for what the services import (deploy/Dockerfile): removes every __pycache__
under the given directories, then imports all of aiwfe's modules (but the `__main__`s, which
start a service) and the modules they import inside functions, so Python writes .pyc files
for exactly those. Anything else still imports, compiled from source when first used (the
image runs with PYTHONDONTWRITEBYTECODE=1); pip and Debian compile every module of every
package, most of which the services never load.

Usage: python precompile.py DIR ...   (run by the interpreter whose bytecode is wanted)
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import sys

# Imported inside functions by aiwfe (grep for indented imports): at start-up or first use.
LAZY = (
    "grpc_health.v1.health_pb2_grpc",
    "google.protobuf.json_format",
    "onnxruntime",
    "tokenizers",
    "uvloop",
    "qdrant_client.http.exceptions",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.instrumentation.psycopg",
    "opentelemetry.instrumentation.redis",
)


def main() -> None:
    sys.dont_write_bytecode = False
    for root in sys.argv[1:]:
        for dirpath, dirs, _files in os.walk(root):
            if "__pycache__" in dirs:
                shutil.rmtree(os.path.join(dirpath, "__pycache__"))
                dirs.remove("__pycache__")
    for top in ("aiwfe", "gateway", "cognitive", "taskproc", "dataplatform"):
        package = importlib.import_module(top)
        for module in pkgutil.walk_packages(package.__path__, top + "."):
            if module.name.rsplit(".", 1)[-1] != "__main__":
                importlib.import_module(module.name)
    for name in LAZY:
        importlib.import_module(name)
    print(f"precompile: {len(sys.modules)} modules imported")


if __name__ == "__main__":
    main()
