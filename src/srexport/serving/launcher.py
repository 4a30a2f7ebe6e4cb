"""``srexport serve``: the tritonserver that the ``serve`` extra ships (nvidia-pytriton's), started
on a repository, watched until ready, stopped cleanly.

nvidia-pytriton carries a genuine ``tritonserver`` with the Python backend and one backend stub
per Python version. The stub for this interpreter is linked into a private backend folder
(the wheel's own folder is left as installed), the wheel's libraries go on the library path,
and this interpreter's import path on PYTHONPATH, so the stub imports srexport and torch as
this process does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError

SERVE_EXTRA = "pip install 'srexport[serve]'"


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise UserError(f"serving needs the tritonserver of nvidia-pytriton: {SERVE_EXTRA}") from None
    return Path(pytriton.__file__).parent


def server_files() -> dict[str, Path]:
    """The binary, the Python backend, this interpreter's stub and the libraries."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = {"binary": root / "tritonserver" / "bin" / "tritonserver",
             "backend": root / "tritonserver" / "backends" / "python",
             "stub": root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
             "libs": root.parent / "nvidia_pytriton.libs"}
    missing = [k for k, p in files.items() if not p.exists()]
    if missing:
        raise UserError(f"nvidia-pytriton is missing its {', '.join(missing)} for Python {version} "
                        f"({files[missing[0]]}); reinstall it: {SERVE_EXTRA}")
    return files


def check_repository(repo: Path) -> None:
    repo = Path(repo)
    if not (repo / "srexport" / "config.pbtxt").is_file():
        raise UserError(f"{repo} is not a repository written by 'srexport triton' (no srexport/config.pbtxt); "
                        "write one with: srexport triton ARTIFACT --out REPO")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` ports the system has free on ``host`` now (for tests and benchmarks: a server
    started right after gets them)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class TritonServer:
    """One tritonserver process on a repository: ``start()``, ``wait_ready()``, ``stop()``; a
    context manager does all three."""

    def __init__(self, repo, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log_file=None, log_verbose: int = 0, exit_timeout: int = 30):
        self.repo, self.host = Path(repo).absolute(), host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log_file, self.log_verbose = log_file, log_verbose
        self.exit_timeout = exit_timeout  # seconds Triton waits for in-flight requests and open connections
        self.process: subprocess.Popen | None = None
        self._backends: Path | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        return {"http": f"http://{self.host}:{self.ports['http']}", "grpc": f"{self.host}:{self.ports['grpc']}",
                "metrics": f"http://{self.host}:{self.ports['metrics']}/metrics"}

    def command(self, backends: Path) -> list[str]:
        files = server_files()
        return [str(files["binary"]), "--model-repository", str(self.repo), "--backend-directory", str(backends),
                "--http-address", self.host, "--http-port", str(self.ports["http"]),
                "--grpc-address", self.host, "--grpc-port", str(self.ports["grpc"]),
                "--metrics-address", self.host, "--metrics-port", str(self.ports["metrics"]),
                "--allow-gpu-metrics", "false", "--log-verbose", str(self.log_verbose),
                "--exit-on-error", "true", "--strict-readiness", "true", "--exit-timeout-secs", str(self.exit_timeout)]

    def environment(self) -> dict[str, str]:
        import site

        import srexport

        env = dict(os.environ)
        libs = str(server_files()["libs"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
        paths = [str(Path(srexport.__file__).parents[1]), *site.getsitepackages(), *[p for p in sys.path if p]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, [*paths, env.get("PYTHONPATH")])))
        return env

    def start(self) -> "TritonServer":
        check_repository(self.repo)
        files = server_files()
        for name, port in self.ports.items():
            if not _port_free(self.host, port):
                raise UserError(f"port {port} ({name}) on {self.host} is in use; choose another --{name}-port")
        self._backends = Path(tempfile.mkdtemp(prefix="srexport-triton-backends-"))
        python = self._backends / "python"
        python.mkdir()
        for item in files["backend"].iterdir():
            if item.is_file():
                os.symlink(item, python / item.name)
        os.symlink(files["stub"], python / "triton_python_backend_stub")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(self._backends), env=self.environment(), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints['http']}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> "TritonServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = _tail(self.log_file)
                self.stop()
                raise UserError(f"tritonserver exited with status {self.process.returncode} before it was ready"
                                + (f": {tail}" if tail else "; pass --log FILE to see why"))
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise UserError(f"tritonserver was not ready after {timeout:g} s; pass --log FILE to see why")

    def stop(self, timeout: float | None = None) -> None:
        timeout = self.exit_timeout + 15 if timeout is None else timeout
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # Triton unloads its models on SIGINT
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None

    def __enter__(self) -> "TritonServer":
        try:
            return self.start().wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(log_file) -> str:
    if not log_file or not Path(log_file).is_file():
        return ""
    lines = [ln for ln in Path(log_file).read_text(errors="replace").splitlines() if ln.startswith("E")]
    return lines[-1][:300] if lines else ""
