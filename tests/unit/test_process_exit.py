"""How an embedtrain process ends (``embedtrain.process.exit_process``, through ``embedtrain.cli.run``): a process
of a multi-process launch leaves without tearing the interpreter down, once its output is flushed (torch's gloo
backend can abort a finished run at interpreter shutdown; see ``exit_process``), and a single process exits
normally."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

# main() replaced by one that prints (unflushed, to a pipe) and returns 3; an atexit handler marks a normal teardown
SCRIPT = (
    "import atexit, embedtrain.cli as cli\n"
    "atexit.register(lambda: print('interpreter teardown'))\n"
    "cli.main = lambda: (print('command output'), 3)[1]\n"
    "cli.run()\n"
)


@pytest.mark.parametrize("world_size, teardown", [(None, True), ("1", True), ("2", False)])
def test_a_launched_process_exits_with_its_code_and_its_output(world_size, teardown):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size:
        env["WORLD_SIZE"] = world_size
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == (["command output", "interpreter teardown"] if teardown else ["command output"])
