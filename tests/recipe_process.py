"""``python launch/train.py ARGS`` for the tests, without paying the imports on every run.

Most of a small recipe run's seconds are its imports (torch, transformers, peft, deepspeed, datasets: about 5 s
on CI's cores), and the suite starts over a hundred of them. Here the script runs as ``__main__`` in a process
forked from multiprocessing's fork server, which imported those once (``multiprocessing.forkserver``, standard
library). What a test sees is what a fresh interpreter gives: the script's own code from its first line, the
command line, the environment (the server starts under :func:`~tests.distributed.launcher_env`'s, the variables
that change an import), the working directory, the exit code (negative: killed by that signal, as
``subprocess``), stdout and stderr. One thing differs: the modules of :data:`PRELOAD` are already imported, so a
missing import in the script could go unseen; the main one-process recipe test runs in a fresh interpreter for
that (``run(..., fresh=True)`` in tests/test_train_recipe.py). A run whose caller sets a variable that libraries read at
import (``PYTHONPATH``, ``HF_*``, ``TORCH*``, ...) otherwise than the launched processes' usual environment, or that
names another launcher, goes through a real interpreter (:func:`run_script`).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

from .distributed import launcher_env

# what launch/train.py imports (and the libraries they import lazily in every run); the server imports each once
PRELOAD = ["torch", "transformers", "peft", "datasets", "deepspeed", "matplotlib.pyplot", "huggingface_hub", "tqdm",
           "psilora_ds", "psilora_ds.recipe.backends", "psilora_ds.recipe.checkpoint", "psilora_ds.recipe.config",
           "psilora_ds.recipe.data", "psilora_ds.recipe.loggers", "psilora_ds.recipe.loop",
           "psilora_ds.recipe.modeling", "psilora_ds.recipe.optimizers", "psilora_ds.recipe.plot",
           "psilora_ds.recipe.resume", "psilora_ds.recipe.run_lock", "psilora_ds.recipe.runlog"]
# variables that libraries read when imported (paths, caches, offline flags, threads): a run whose caller sets them
# otherwise than the launched processes' usual environment gets a real interpreter
IMPORT_TIME_PREFIXES = ("PYTHON", "HF_", "TRANSFORMERS_", "TORCH", "DS_", "OMP_", "MKL_", "CUDA", "BNB_")

_context = None


def _server_context():
    """The fork server's context, started once under the launched processes' environment (the variables read at
    import time: offline hub, one thread, the DeepSpeed op cache) and with :data:`PRELOAD` imported."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(launcher_env(MPLBACKEND="Agg"))
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _run_as_main(script: str, argv: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str) -> None:
    """In the forked process: become ``python script argv`` (stdout/stderr into the files) and exit as it would."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # (the server's pool size was set by its env)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))  # as the interpreter does for a script
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:
            print(done.code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: the interpreter's traceback and exit code 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_script(cmd: list[str], env: dict[str, str], cwd: str, timeout: float,
               fork: bool = True) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``; ``[sys.executable, script, *args]`` with an
    environment that changes no import runs in a process forked from the fork server (unless ``fork`` is False)."""
    script = fork and cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py")
    usual = launcher_env()  # (variables that libraries in this process set since, e.g. torch's inductor cache dir, are
    # in both: what counts is what the caller changes)
    imports_differ = any(env.get(k) != usual.get(k) for k in {*env, *usual} if k.startswith(IMPORT_TIME_PREFIXES))
    if not script or imports_differ:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    context = _server_context()
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = context.Process(target=_run_as_main, args=(cmd[1], cmd[2:], env, cwd, out_path, err_path))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        if not os.path.exists(err_path):  # (the fork server could not start it: say so, not FileNotFoundError)
            raise RuntimeError(f"the fork server did not start {cmd[1]} (exit code {process.exitcode})")
        with open(out_path) as out, open(err_path) as err:
            return subprocess.CompletedProcess(cmd, process.exitcode, out.read(), err.read())
