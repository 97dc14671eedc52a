"""nginx as a reference gRPC proxy: `grpc_pass` to cognitive, no authentication.

Used only when `nginx` is on PATH (the Debian package); the harness never installs it.
Everything nginx writes (config, pid file, error log, temp dirs) lives in a temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import procstat

CONFIG = """\
{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream cognitive {{
        server {upstream};
        keepalive 32;  # reuse upstream HTTP/2 connections, as the gateway's channel does
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            # Client request headers, x-aiwfe-identity included, pass through unchanged
            # (grpc_pass_request_headers is on by default), so cognitive sees the caller's
            # internal assertion exactly as in the direct scenario.
            grpc_pass grpc://cognitive;
        }}
    }}
}}
"""


def available() -> str | None:
    """The nginx binary on PATH, or None."""
    return shutil.which("nginx")


def version(binary: str) -> str:
    """`nginx -v` (it prints to stderr)."""
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip()


def free_port() -> int:
    """A free loopback port (nginx cannot pick one itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """An nginx in the foreground (`daemon off`), its own process group, stopped on exit."""

    def __init__(self, binary: str, upstream: str) -> None:
        self.binary = binary
        self.upstream = upstream
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="aiwfe-bench-nginx-")
        tmp = self._tmp.name
        self.port = free_port()
        # As root the workers would switch to "nobody", who cannot enter the 0700 temp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(CONFIG.format(user=user, tmp=tmp, upstream=self.upstream, port=self.port))
        self.process = subprocess.Popen(
            [self.binary, "-p", tmp, "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = Path(tmp, "error.log")
                err += log.read_text() if log.exists() else ""
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {self.address} within {timeout} s")

    def pids(self) -> list[int]:
        """Master and workers: the proxy's CPU is all of them."""
        if self.process is None:
            return []
        return [self.process.pid, *procstat.children(self.process.pid)]

    def error_log(self) -> str:
        if self._tmp is None:
            return ""
        log = Path(self._tmp.name, "error.log")
        return log.read_text() if log.exists() else ""

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL to the whole group; removes the temp dir."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGQUIT)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if self.process is not None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
                if self.process.stderr:
                    self.process.stderr.close()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
