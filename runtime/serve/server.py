"""Start and stop a local ``tritonserver`` (the binary the ``nvidia-pytriton`` wheel ships) on a model repository.

    python -m runtime.serve.server REPO [--model NAME ...] [--http-port 8000] [--grpc-port 8001]   # until Ctrl-C

    with TritonServer("REPO", models=["tinyworld"]) as server:    # free ports on 127.0.0.1, waits until ready
        server.http_url, server.grpc_url                           # "127.0.0.1:PORT" for tritonclient
        server.rss_bytes()                                         # resident memory of server + Python stubs

What the wheel needs to run a Python-backend model (found on this machine): its ``backends/python`` folder
(``libtriton_python.so``, ``triton_python_backend_utils.py``) plus the stub of the running Python's version from
``python_backend_stubs/<X.Y>/`` in one folder; ``LD_LIBRARY_PATH`` at the wheel's ``nvidia_pytriton.libs``
and at this Python's libpython folder (the stub embeds it); ``PYTHONPATH`` at the folder holding ``runtime``
and at this environment's site-packages (the stub runs Python isolated, so ``model.py`` puts ``PYTHONPATH`` on
``sys.path`` itself). The wheel's stub is compiled against numpy 1.x: under numpy 2 every tensor it hands a model
is garbage (measured: INT32 ``[7, 8, 9, 10]`` arrives as ``[7, 7, 7, 7]``, outputs come back empty), so the stub
gets numpy 1.26 from a side folder, :data:`STUB_SITE` (``pip install --no-deps --target
<venv>/triton-stub-site numpy==1.26.4``; ``make test`` does it), ahead of everything else; the lean runtime's
images are bit-identical under numpy 1.26 and 2.x (the parity tests compare the server with the API under the
environment's numpy 2). The server runs in its own process group (the stubs are its children), so
:meth:`TritonServer.stop` ends all of it.

Lean: standard library only (readiness is polled over HTTP with urllib); tests and ``python -m bench serve``
use it, ``runtime generate`` never imports it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the folder that holds the runtime package
STUB = "triton_python_backend_stub"
# numpy 1.x for the stub only (module docstring); GRT_TRITON_STUB_SITE overrides the place
STUB_SITE = Path(os.environ.get("GRT_TRITON_STUB_SITE") or Path(sys.prefix) / "triton-stub-site")
INSTALL_HINT = ("pip install --no-deps nvidia-pytriton==0.7.0 && pip install --no-deps --target "
                f"{STUB_SITE} numpy==1.26.4 (or `make test`, which installs both)")


@dataclass(frozen=True)
class Distribution:
    """Where the wheel's server pieces are."""

    binary: Path
    python_backend: Path   # libtriton_python.so, triton_python_backend_utils.py
    stub: Path             # for this Python's version
    libs: Path             # nvidia_pytriton.libs


def find_tritonserver() -> Distribution | None:
    """The ``nvidia-pytriton`` wheel's tritonserver for this Python, or None (not installed, or no stub for this
    Python version). The package is located, not imported: its own imports are not needed here."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = Distribution(base / "bin" / "tritonserver", base / "backends" / "python",
                        base / "python_backend_stubs" / version / STUB, base.parent.parent / "nvidia_pytriton.libs")
    present = (dist.binary.is_file() and (dist.python_backend / "libtriton_python.so").is_file()
               and dist.stub.is_file() and dist.libs.is_dir())
    return dist if present else None


def missing() -> str | None:
    """Why a local Triton server cannot run here (None when it can): tests skip with this reason."""
    if find_tritonserver() is None:
        return (f"tritonserver with a Python {sys.version_info.major}.{sys.version_info.minor} stub not found "
                f"(the nvidia-pytriton wheel, Linux x86-64): {INSTALL_HINT}")
    if not any(STUB_SITE.glob("numpy-1.*.dist-info")):
        return f"numpy 1.x for Triton's Python stub not found in {STUB_SITE}: {INSTALL_HINT}"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server did not start or become ready (the message ends with its log's tail)."""


class TritonServer:
    """One ``tritonserver`` process on ``repository`` (explicit model control: ``models`` load at start, others
    with the client's ``load_model``), HTTP and gRPC bound to 127.0.0.1 on free ports, metrics off."""

    def __init__(self, repository: str | Path, models: list[str] | None = None, log: str | Path | None = None,
                 ready_timeout: float = 180.0, env: dict[str, str] | None = None, http_port: int | None = None,
                 grpc_port: int | None = None):
        self.repository, self.models = Path(repository).resolve(), list(models or [])
        self.ready_timeout, self.extra_env = ready_timeout, dict(env or {})
        reason = missing()
        if reason:
            raise ServerError(reason)
        self.dist = find_tritonserver()
        self.work = Path(tempfile.mkdtemp(prefix="grt-triton-"))
        self.log_path = Path(log) if log else self.work / "server.log"
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def environment(self) -> dict[str, str]:
        """The server's (and so its stubs') environment: libraries, the stub's libpython, the runtime's imports."""
        env = dict(os.environ)
        site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        env["PYTHONPATH"] = os.pathsep.join([str(STUB_SITE), str(ROOT), *sorted(site),
                                             *filter(None, [env.get("PYTHONPATH")])])
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.dist.libs), libdir,
                                                               env.get("LD_LIBRARY_PATH")]))
        env.update(self.extra_env)
        return env

    def backend_directory(self) -> Path:
        """``<work>/backends/python``: the wheel's Python backend with this Python's stub beside it."""
        folder = self.work / "backends" / "python"
        folder.mkdir(parents=True, exist_ok=True)
        for item in self.dist.python_backend.iterdir():
            if item.is_file():
                shutil.copy2(item, folder / item.name)
        shutil.copy2(self.dist.stub, folder / STUB)
        return folder.parent

    def command(self) -> list[str]:
        cmd = [str(self.dist.binary), f"--model-repository={self.repository}",
               f"--backend-directory={self.backend_directory()}", "--model-control-mode=explicit",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false", "--allow-sagemaker=false", "--allow-vertex-ai=false",
               "--exit-timeout-secs=10", "--log-verbose=0"]
        return cmd + [f"--load-model={m}" for m in self.models]

    def start(self) -> TritonServer:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(),
                                            start_new_session=True, cwd=self.work)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.ready_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        """The server and every process of its session (the Python stubs)."""
        if self.process is None or self.process.poll() is not None:
            return []
        sid, out = self.process.pid, []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[3]) == sid:  # field 6 of stat: the session id
                    out.append(int(entry.name))
        return sorted(out)

    def rss_bytes(self) -> int:
        """Resident memory of the server and its stubs together."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def stop(self) -> None:
        """End the server's whole process group (TERM, then KILL after 15 s) and remove its work folder."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:  # stubs left behind after the server itself exited
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve a repository's models on 127.0.0.1 until Ctrl-C (the server is stopped on the way out)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m runtime.serve.server", description=main.__doc__)
    p.add_argument("repository", type=Path, help="a model repository written by `runtime triton-repo`")
    p.add_argument("--model", action="append", default=None, help="a model to load (default: every model folder)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--log", type=Path, default=None, help="the server's log file (default: a temporary one)")
    args = p.parse_args(argv)
    if not args.repository.is_dir():
        print(f"error: {args.repository} is not a folder: write one with `runtime triton-repo`", file=sys.stderr)
        return 3
    models = args.model or sorted(d.name for d in args.repository.iterdir() if (d / "config.pbtxt").is_file())
    try:
        server = TritonServer(args.repository, models, log=args.log, http_port=args.http_port,
                              grpc_port=args.grpc_port).start()
    except ServerError as e:
        print(f"error: {' '.join(str(e).split())[:2000]}", file=sys.stderr)
        return 5
    print(f"serving {', '.join(models)}: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C stops)", flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(0.5)
        print(f"error: tritonserver exited with code {server.process.returncode}: {server.log_tail()}", file=sys.stderr)
        return 5
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
