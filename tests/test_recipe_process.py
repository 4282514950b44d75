"""tests/recipe_process.py, which most recipe tests run through: a script forked from the fork server gives what a
fresh interpreter gives (exit code, stdout, stderr, argv, environment, working directory, a signal's death); a
caller that changes an import-time variable gets a real interpreter."""

import os
import signal
import subprocess
import sys

from .distributed import launcher_env
from .recipe_process import run_script

SCRIPT = """import os, sys
print("out", sys.argv[1:], os.getcwd(), os.environ.get("PROBE"), os.getppid())
print("err", file=sys.stderr)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
sys.exit(int(sys.argv[1]))
"""


def test_a_forked_script_gives_what_a_fresh_interpreter_gives(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = launcher_env(PROBE="x")
    for args in (["3"], ["0"], ["kill"]):
        cmd = [sys.executable, str(script), *args]
        forked = run_script(cmd, env=env, cwd=str(tmp_path), timeout=120)
        fresh = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
        assert forked.returncode == fresh.returncode == {"3": 3, "0": 0, "kill": -signal.SIGKILL}[args[0]]
        assert forked.stderr == fresh.stderr == "err\n"
        out, expected = forked.stdout.split(), fresh.stdout.split()
        assert out[:-1] == expected[:-1] and f"'{args[0]}']" in forked.stdout and "x" in out
        assert int(out[-1]) != os.getpid()  # forked: its parent is the fork server, not this process
    changed = run_script([sys.executable, str(script), "0"], env=launcher_env(PYTHONPATH=str(tmp_path)),
                         cwd=str(tmp_path), timeout=120)
    assert changed.returncode == 0 and int(changed.stdout.split()[-1]) == os.getpid()  # a real interpreter
