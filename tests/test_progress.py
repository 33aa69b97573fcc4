"""Progress bars: drawn on stderr when it is a terminal, and nothing extra when it is not (a pipe, CI, a log file);
stdout carries only the command's JSON either way."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from conftest import DATA
from test_checkpoint import save_huggingface, tiny_model

PAIRS_FILE = os.path.join(DATA, "address_pairs.tsv")


def run(args, stderr_on_terminal: bool) -> tuple[str, str]:
    """(stdout, stderr) of ``mgeo-service args``, its stderr a pseudo-terminal or a pipe."""
    command = [sys.executable, "-m", "mgeo_service", *args]
    if not stderr_on_terminal:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    terminal, attached = pty.openpty()
    fcntl.ioctl(attached, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns: a real window
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=attached, text=True)
    os.close(attached)
    drawn = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child closed the terminal's last end
            break
        if not chunk:
            break
        drawn += chunk
    os.close(terminal)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0, drawn
    return stdout, drawn.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_huggingface(tiny_model(), tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("args, bar", [
    (["evaluate", PAIRS_FILE], "evaluate: 100%"),
    (["predict", "--file", PAIRS_FILE], "predict: 100%"),
    (["export"], "export: 100%"),
])
def test_a_bar_on_a_terminal_and_nothing_on_a_pipe(args, bar, tiny_model_dir):
    args = [*args, "--model", tiny_model_dir]
    lines = 1 if args[0] != "predict" else 66
    for on_terminal in (True, False):
        stdout, stderr = run(args, on_terminal)
        assert len([json.loads(line) for line in stdout.splitlines()]) == lines  # stdout: JSON only
        assert (bar in stderr) == on_terminal, stderr
        assert ("it/s" in stderr or "pair/s" in stderr or "graph/s" in stderr) == on_terminal
