"""bench/gpu_suite.sh runs only on a CUDA machine (CI has none): here, what can be checked without one.
Without a GPU it refuses with one error line (exit 2); every command it runs names a script that exists,
flags that script accepts and recipe keys that exist, so that a GPU session's one call is not lost to a typo."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from .distributed import launcher_env
from .recipe_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "gpu_suite.sh")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")


def suite_commands() -> list[list[str]]:
    """The argv of every ``part`` of the suite, its variables filled in."""
    text = open(SUITE).read().replace("\\\n", " ")
    recipe = re.search(r'^recipe="([^"]*)"', text, re.M).group(1)
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("part "):
            line = line.replace("$recipe", recipe).replace('"$py"', "python").replace('"$out', '"OUT')
            argv = shlex.split(line)[3:]  # part NAME TIMEOUT
            commands.append(argv)
    return commands


def test_the_suite_is_valid_bash():
    assert subprocess.run(["bash", "-n", SUITE]).returncode == 0


@no_gpu
def test_without_a_gpu_the_suite_and_its_checks_refuse_with_one_line(tmp_path):
    runs = [["bash", SUITE, str(tmp_path / "report")],
            [sys.executable, os.path.join(ROOT, "bench", "gpu_checks.py"), "fp16-overflow", "--stage", "2"]]
    for argv in runs:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "needs a CUDA GPU" in lines[0], done.stderr
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())


def test_every_command_of_the_suite_names_real_scripts_flags_and_recipe_keys():
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import FIELDS

    commands = suite_commands()
    assert len(commands) >= 9
    helps: dict[str, str] = {}
    for argv in commands:
        if "pytest" in argv:  # tests that need CUDA: the selection names at least one test
            done = subprocess.run([sys.executable, *argv[1:], "--collect-only"], capture_output=True, text=True,
                                  cwd=ROOT)
            assert done.returncode == 0, done.stdout
            assert re.search(r"(^|\s)[1-9]\d*(/\d+)? tests? collected", done.stdout), done.stdout
            continue
        script = next(a for a in argv if a.endswith(".py"))
        path = os.path.join(ROOT, script)
        assert os.path.isfile(path), script
        flags = [a.split("=")[0] for a in argv[argv.index(script) + 1:] if a.startswith("--")]
        if script == "launch/train.py":
            unknown = [f for f in flags if f[2:] not in FIELDS]
            assert not unknown, f"recipe keys that do not exist: {unknown}"
            for f in ("--ds_config",):
                config = argv[argv.index(f) + 1]
                assert os.path.isfile(os.path.join(ROOT, config)), config
            continue
        sub = [a for a in argv[argv.index(script) + 1:] if not a.startswith("-")][:1]
        key = " ".join([script, *sub]) if script.endswith("gpu_checks.py") else script
        if key not in helps:
            extra = sub if script.endswith("gpu_checks.py") else []
            done = run_script([sys.executable, path, *extra, "--help"], env=launcher_env(), cwd=ROOT, timeout=300)
            assert done.returncode == 0, done.stderr
            helps[key] = done.stdout
        unknown = [f for f in flags if f not in helps[key]]
        assert not unknown, f"{key} does not take {unknown}"


# the size flags of the suite's timing scripts, shrunk to a toy size (every other flag as the suite passes it)
TOY_SIZES = {"--hidden": "64", "--layers": "1", "--rank": "4", "--tokens": "1024", "--rounds": "1", "--repeats": "1",
             "--shapes": "small"}
TIMING_SCRIPTS = ("bench/step_overhead.py", "bench/thin_products.py", "bench/balance.py", "bench/cache_policy.py")


def toy_size(argv: list[str]) -> list[str]:
    """``argv`` with the values of :data:`TOY_SIZES`' flags replaced (a flag with several values keeps one)."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a in TOY_SIZES
            out += [a, TOY_SIZES[a]] if skipping else [a]
        elif not skipping:
            out.append(a)
    return out


@pytest.mark.slow
def test_the_suites_timing_scripts_run_on_the_cpu_at_a_toy_size():
    """Each single-process timing script of the suite runs to its table with the suite's own flags (methods, dtypes)
    at a toy size, so that a GPU session's one call is not lost to a crash (bench/cache_policy.py once called
    step_overhead's ``build`` by an old signature)."""
    ran = set()
    for argv in suite_commands():
        script = next((a for a in argv if a in TIMING_SCRIPTS), None)
        if script is None:
            continue
        toy = toy_size(argv[argv.index(script) + 1:])
        done = run_script([sys.executable, os.path.join(ROOT, script), *toy], env=launcher_env(), cwd=ROOT,
                          timeout=600)
        assert done.returncode == 0, f"{script} {toy}: {done.stderr[-2000:]}"
        assert "|---|" in done.stdout, done.stdout[-2000:]
        ran.add(script)
    assert ran == set(TIMING_SCRIPTS), ran
