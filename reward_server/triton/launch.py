"""Start a real ``tritonserver`` on a model repository, on a plain machine as well as in the NGC container.

A system Triton (``tritonserver`` on PATH, or the NGC image's /opt/tritonserver) is used as it is. Otherwise the
binary bundled in the ``nvidia-pytriton`` wheel is prepared the way it needs on a machine without the container:

* the Python-backend stub for this interpreter's version is copied next to ``libtriton_python.so`` in a backend
  folder of our own (``--backend-directory``);
* ``LD_LIBRARY_PATH`` holds this interpreter's library folder (the stub links ``libpython3.X.so``, which must match
  the running standard library) and the wheel's ``nvidia_pytriton.libs`` (the stub's bundled libraries);
* this interpreter's ``bin`` folder goes first on ``PATH``: the stub's embedded Python finds its prefix from the
  ``python3`` on PATH, so in a virtual environment the models import this environment's packages (ddpo, numpy < 2),
  not the base interpreter's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import sysconfig
from pathlib import Path

SYSTEM_TRITON = Path("/opt/tritonserver/bin/tritonserver")


@dataclasses.dataclass(frozen=True)
class TritonCommand:
    argv: list[str]
    env: dict[str, str]


def _bundled_triton() -> Path:
    try:
        import pytriton
    except ImportError:
        raise RuntimeError(
            "no tritonserver found: install Triton (or use the NGC tritonserver image), or install the bundled one "
            "with `pip install 'ddpo[triton]'`"
        ) from None
    return Path(pytriton.__file__).parent / "tritonserver"


def python_library_path(env: dict[str, str]) -> str:
    """``LD_LIBRARY_PATH`` with this interpreter's library folder first: the stub must load the libpython that matches
    the running standard library, not another Python 3.X on the system."""
    return ":".join(p for p in (str(sysconfig.get_config_var("LIBDIR")), env.get("LD_LIBRARY_PATH", "")) if p)


def prepare_bundled_backends(dist: Path, workdir: Path) -> Path:
    """Copy the bundled Python backend (in ``dist``) and this interpreter's stub into ``workdir``; return the backend
    folder."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton has no Python-backend stub for Python {version} (looked for {stub})")
    backends = workdir / "backends"
    shutil.copytree(dist / "backends", backends, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def tritonserver_command(
    model_repository: Path,
    workdir: Path,
    *,
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    extra_args: tuple[str, ...] = (),
) -> TritonCommand:
    """The command and environment that serve ``model_repository``; ``workdir`` holds the prepared backends."""
    if not model_repository.is_dir():
        raise ValueError(f"model repository {model_repository} is not a folder")
    ports = [
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        f"--grpc-address={host}",
        f"--http-address={host}",
        f"--metrics-address={host}",
    ]
    system = shutil.which("tritonserver") or (str(SYSTEM_TRITON) if SYSTEM_TRITON.is_file() else None)
    env = dict(os.environ)
    if system is not None:
        argv = [system, f"--model-repository={model_repository}", *ports, *extra_args]
        return TritonCommand(argv, env)
    dist = _bundled_triton()
    binary = dist / "bin" / "tritonserver"
    backends = prepare_bundled_backends(dist, workdir)
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = python_library_path({"LD_LIBRARY_PATH": f"{libs}:{env.get('LD_LIBRARY_PATH', '')}"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    argv = [
        str(binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={backends}",
        *ports,
        *extra_args,
    ]
    return TritonCommand(argv, env)
