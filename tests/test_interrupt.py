"""A training killed mid-run (SIGINT, SIGTERM or SIGKILL) and run again with the same command ends with the same
weights, bitwise, as a run that was never interrupted.

On one thread: with two, two uninterrupted runs of the same command differ by an ulp now and then (1 run in 4 here,
on an Intel CPU, with MKL's reproducibility mode on or off), so bitwise equality is only defined at one thread."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from safetensors.torch import load_file

ITERS = 48
ARGS = ["train", "l2c", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
ARGS += ["--iters", str(ITERS), "--prompt", "a red apple", "--prompt", "a cat", "--json", "--threads", "1"]


def _weights(out):
    (file,) = (out / "router").glob("*.safetensors")
    return load_file(file)


SIGINT_AS_UNDER_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'diffroute'; runpy.run_module('diffroute', run_name='__main__', alter_sys=True)"
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = run_cli(*ARGS, "--out", out)  # in this process, at one thread like every run here (see conftest.run_cli)
    assert proc.returncode == 0, proc.stderr
    return _weights(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_training_resumes_to_the_same_weights(tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    # SIGINT handled as under a terminal: a shell that started the suite in the background (`make test &`) leaves it
    # ignored in every child (POSIX), and Python then installs no KeyboardInterrupt handler at all; set here rather
    # than in a preexec_fn, which is unsafe in a process with threads (torch's)
    cmd = [sys.executable, "-c", SIGINT_AS_UNDER_A_TERMINAL, *ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    meta = out / "checkpoint.json"
    deadline = time.time() + 300
    while not meta.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:  # one line saying how to resume, not a KeyboardInterrupt stack
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    step = json.loads(meta.read_text())["step"]
    assert 0 < step < ITERS, "the run was not interrupted mid-way"
    again = run_cli(*ARGS, "--out", out)  # the resume needs no process of its own (only the killed run does)
    assert again.returncode == 0, again.stderr
    resumed = _weights(out)
    assert resumed.keys() == uninterrupted.keys()
    assert all(resumed[k].equal(uninterrupted[k]) for k in resumed), f"resumed from step {step}"
