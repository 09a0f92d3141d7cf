"""Shared fixtures: the six tiny random-weight routed pipelines and the call arguments each one takes."""

import contextlib
import io
import os
import traceback
import warnings
from dataclasses import dataclass

import pytest
import torch

from diffroute.zoo.tiny import TINY_PIPELINES

warnings.filterwarnings("ignore", message=".*torchvision.*")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

STEPS = 6

# Per pipeline: the arguments of one call for one "prompt" p (a string, or a class label for DiT).
_TEXT = {"height": 16, "width": 16}
CALL_KWARGS = {
    "pixart-alpha": dict(_TEXT, clean_caption=False, use_resolution_binning=False, max_sequence_length=16),
    "pixart-sigma": dict(_TEXT, clean_caption=False, use_resolution_binning=False, max_sequence_length=16),
    "dit": {},
    "sd3": dict(_TEXT),
    # FLUX is guidance-distilled; true CFG (a negative prompt) makes it call the transformer twice per step.
    "flux": dict(_TEXT, max_sequence_length=16, true_cfg_scale=2.0, negative_prompt="blurry"),
    "sana": dict(
        height=32, width=32, use_resolution_binning=False, complex_human_instruction=None, max_sequence_length=16
    ),
}
PROMPTS = {"dit": [0, 1]}
NAMES = list(TINY_PIPELINES)


def prompts(name):
    return PROMPTS.get(name, ["a red apple", "a smiling cat"])


def run(pipe, name, prompt_list, seeds, steps=STEPS):
    """Generate one image per prompt with one generator per prompt; returns a float32 numpy batch."""
    key = "class_labels" if name == "dit" else "prompt"
    kwargs = dict(CALL_KWARGS[name])
    if "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompt_list)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(**{key: prompt_list}, **kwargs, num_inference_steps=steps, generator=gens, output_type="np")
    return out.images


def step_counter(pipe):
    """Count a pipeline's denoising steps from its transformer calls, for reference implementations written as plain
    forward replacements: a new timestep is a new step, calls at the same timestep (true CFG) are branches. Returns
    the state ({"step", "branch"}) and the hook's handle."""
    state = {"step": -1, "branch": 0, "t": None}

    def count(module, args, kwargs):
        t = float(torch.as_tensor(kwargs["timestep"]).reshape(-1)[0])
        state["branch"] = state["branch"] + 1 if t == state["t"] else 0
        state["step"] += t != state["t"]
        state["t"] = t

    return state, pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)


def routed_and_reference(pipe, name, plan, reference):
    """The images of the test prompts under `plan` (seeds 0, 1), the call's stats, and the same images with the plan
    removed and `reference(pipe)` in place (plain forward replacements; returns a handle removed afterwards)."""
    import diffroute

    diffroute.apply(pipe, plan)
    routed = run(pipe, name, prompts(name), [0, 1])
    stats = pipe.last_stats
    diffroute.remove(pipe)
    handle = reference(pipe)
    try:
        return routed, stats, run(pipe, name, prompts(name), [0, 1])
    finally:
        handle.remove()


def fresh_pipe(name="pixart-alpha"):
    """A new tiny pipeline of its own (for tests that change it), progress bars off."""
    pipe = TINY_PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipes():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fresh_pipe(name)
        return cache[name]

    return get


@dataclass
class CliResult:
    """What a `diffroute` command left: its exit status and what it printed (as `subprocess.run` would give)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args) -> CliResult:
    """Run the `diffroute` command in this process: a subprocess spends ~5 s starting Python and importing torch and
    diffusers per call. Tests that need a process of their own (signals, launchers, installed wheels) keep using
    subprocess. An uncaught exception becomes exit status 1 with its traceback on stderr, as in a subprocess; the
    torch thread count is restored, since `--threads` sets it for the whole process."""
    from diffroute.cli.main import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
    return CliResult(code, out.getvalue(), err.getvalue())
