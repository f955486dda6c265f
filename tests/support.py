"""Helpers for tests that run the real `megacpm` command in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "megacpm", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "megacpm", *map(str, args)], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def torchrun_command(nproc, *args, launcher_args=("--standalone",)):
    """``python -m torch.distributed.run`` (torchrun) of ``megacpm`` with ``nproc`` local workers."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, f"--nproc_per_node={nproc}",
            "-m", "megacpm", *map(str, args)]


def torchrun_env():
    # One thread per worker: several workers share this machine's cores.
    return dict(cli_env(), OMP_NUM_THREADS="1")


def run_torchrun(nproc, *args, launcher_args=("--standalone",), timeout=600):
    return subprocess.run(torchrun_command(nproc, *args, launcher_args=launcher_args), env=torchrun_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_torchrun(nproc, *args, launcher_args=("--standalone",)):
    return subprocess.Popen(torchrun_command(nproc, *args, launcher_args=launcher_args), env=torchrun_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def imported_tool(path: Path, name: str):
    """A tools/ script imported as a module (for a module-scoped fixture: ``yield from``). It is
    registered in sys.modules while in use, because its dataclasses look their module up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
