"""A kvstar storage node started as a child process, for examples, tests and the accuracy harness.

    with StorageNode(data_dir="/tmp/kvstar-data") as node:
        client = kvstar.Client(node.address)

The binary is $KVSTAR_SERVER, else the repository's bazel-bin/server/kvstar_server, else
`kvstar_server` beside this package or on PATH. The node listens on a free loopback port, keeps its
blocks in embedded RocksDB under `data_dir` (a fresh temporary directory when none is given, removed
on exit) and is stopped with SIGTERM on exit.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time

__all__ = ["StorageNode", "find_server"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.abspath(os.path.join(_PACKAGE_DIR, "..", "..", ".."))


def find_server():
    """Path of the kvstar_server binary, or FileNotFoundError saying where it looked."""
    candidates = [os.environ.get("KVSTAR_SERVER"),
                  os.path.join(_REPO_ROOT, "bazel-bin", "server", "kvstar_server"),
                  os.path.join(_PACKAGE_DIR, "kvstar_server"),
                  shutil.which("kvstar_server")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("kvstar_server not found (set KVSTAR_SERVER, or build it with "
                            "`bazel build -c opt //server:kvstar_server`); looked at " +
                            ", ".join(p for p in candidates if p))


class StorageNode:
    """A kvstar_server child process on 127.0.0.1 (or an existing node when `address` is given)."""

    def __init__(self, data_dir=None, address=None, backend="rocksdb", extra_flags=(),
                 start_timeout_s=60.0, log_path=None):
        self.address = address
        self._process = None
        self._temp_dir = None
        self._log = None
        if address is not None:
            return
        if data_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="kvstar-node-")
            data_dir = os.path.join(self._temp_dir, "data")
        os.makedirs(data_dir, exist_ok=True)
        self.data_dir = data_dir
        port_file = os.path.join(self._temp_dir or data_dir, ".kvstar-port")
        if os.path.exists(port_file):
            os.remove(port_file)
        self._log = open(log_path or os.devnull, "ab")
        command = [find_server(), "--listen=127.0.0.1:0", f"--backend={backend}",
                   f"--data_dir={data_dir}", f"--port_file={port_file}", *extra_flags]
        self._process = subprocess.Popen(command, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._cleanup()
                raise RuntimeError(f"kvstar_server exited with {self._process.returncode} at "
                                   f"start: {' '.join(command)}")
            try:
                with open(port_file) as f:
                    port = f.read().strip()
                if port:
                    self.address = f"127.0.0.1:{port}"
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.close()
        raise TimeoutError(f"kvstar_server did not report its port within {start_timeout_s} s")

    def close(self):
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._cleanup()

    def _cleanup(self):
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
