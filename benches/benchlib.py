"""Helpers shared by the side-by-side benchmark scripts in this folder."""

import os
import shutil
import socket
import subprocess
import sys
import time


def free_port():
    """A free loopback port (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary_or_path, package):
    """Install the Debian `package` unless `binary_or_path` is on PATH or exists."""
    if shutil.which(binary_or_path) or os.path.exists(binary_or_path):
        return
    print(f"installing {package} for {binary_or_path}", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", package], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def wait_port(port, timeout=20):
    """Wait until 127.0.0.1:`port` accepts connections."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")
