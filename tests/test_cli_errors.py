"""Every refusal of the `diffroute` command: exit status 2, one line saying what is wrong, no traceback, and no work
(no output folder written, no shipped file changed); resumed runs with other settings are refused, naming them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from diffroute.zoo.emoji import WEIGHTS


def _cli(*args, timeout=600):
    return run_cli(*args)  # in this process (see conftest.run_cli)


def _refused(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


GEN = ("generate", "--model", "tiny-pixart", "--prompt", "cat")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--steps", "-5"), "argument --steps: -5 is out of range"),
        (("--steps", "0"), "argument --steps: 0 is out of range"),
        (("--seed", str(2**64)), "argument --seed"),
        (("--guidance", "nan"), "argument --guidance"),
        (("--guidance", "-1"), "argument --guidance"),
        (("--device", "cuda"), "sees no CUDA GPU"),
        (("--device", "warp"), "is not a torch device"),
        (("--prompt", "  "), "--prompt must not be empty"),
        (("--attention", "fastest"), "argument --attention: unknown attention back-end 'fastest'"),
        (("--dtype", "float8"), "argument --dtype: invalid choice"),
        (("--compile", "all"), "argument --compile: invalid choice"),
        (("--attention", "dispatch:warp"), "unknown diffusers attention back-end in 'dispatch:warp'"),
    ],
)
def test_generate_refusals(tmp_path, extra, needle):
    out = tmp_path / "out"
    _refused(_cli(*GEN, "--out", out, *extra), needle)
    assert not out.exists()


def test_empty_prompts_file_is_refused_not_replaced_by_defaults(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _refused(_cli("generate", "--model", "tiny-pixart", "--prompts-file", empty, "--out", tmp_path / "o"), "no prompts")


def test_out_that_is_a_file_or_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(_cli(*GEN, "--out", blocker), "is a file, not a folder")
    _refused(_cli(*GEN, "--out", blocker / "sub"), "cannot be created")
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(images / f"{i}.png")
    _refused(_cli("eval", "stats", images, "--out", blocker / "ref.npz", "--features", "emoji-clip"), "is a file")


def test_bench_batch_zero():
    _refused(_cli("bench", "overhead", "--model", "tiny-pixart", "--batch", "0"), "argument --batch")


def test_pairing_on_a_bench_that_does_not_pair():
    _refused(_cli("bench", "reuse", "--models", "tiny-pixart", "--pairing", "neighbours"), "--pairing is for bench")


def test_truncated_png_and_bad_clip_model(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(good / f"{i}.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8)).save(broken / f"{i}.png")
    data = (broken / "1.png").read_bytes()
    (broken / "1.png").write_bytes(data[: len(data) // 2])
    _refused(_cli("eval", "fid", good, broken, "--features", "emoji-clip"), "1.png", "not a readable image")
    proc = _cli("eval", "fid", good, good, "--features", "clip:/not/a/model")
    _refused(proc, "/not/a/model")
    assert proc.stderr.count("error") == 1


def test_calibrate_never_writes_into_the_package(tmp_path):
    shipped = WEIGHTS / "emoji" / "teacache.json"
    before = shipped.read_bytes()
    _refused(_cli("calibrate", "--model", "emoji", "--n", "2", "--steps", "3"), "shipped inside the diffroute package")
    assert shipped.read_bytes() == before
    _refused(_cli("calibrate", "--model", "emoji", "--out", tmp_path), "is a folder")
    out = tmp_path / "calib.json"
    proc = _cli("calibrate", "--model", "tiny-pixart", "--prompt", "a", "--prompt", "b", "--steps", "4", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["model_class"] == "PixArtTransformer2DModel"


# ---- resume never mixes settings ------------------------------------------------------------------------------------
def test_compare_resume_refuses_other_settings(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("red apple\ncat\nblue car\n")
    out = tmp_path / "cmp"
    base = ["eval", "compare", "--model", "tiny-pixart", "--prompts", prompts, "--n", "2", "--batch", "2"]
    base += ["--repeats", "1", "--plans", "fora-2", "--out", out, "--json"]
    first = _cli(*base, "--steps", "4")
    assert first.returncode == 0, first.stderr
    _refused(_cli(*base, "--steps", "5"), "other settings", "steps: 4 then, 5 now", "--overwrite")
    _refused(_cli(*base, "--steps", "4", "--seed", "1"), "seed: 0 then, 1 now")
    prompts.write_text("green apple\ncat\nblue car\n")
    _refused(_cli(*base, "--steps", "4"), "prompts:")
    again = _cli(*base, "--steps", "5", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["steps"] == 5
    assert json.loads((out / "images" / "run.json").read_text())["steps"] == 5


def test_compare_resume_refuses_a_changed_schedule_file(tmp_path):
    import diffroute
    from diffroute.zoo.tiny import tiny_pixart_demo

    arch = diffroute.architecture_map(tiny_pixart_demo().transformer)
    sched = tmp_path / "mine.json"
    diffroute.Schedule.fora(arch, 4, 2).save(sched)
    prompts = tmp_path / "p.txt"
    prompts.write_text("red apple\ncat\n")
    base = ["eval", "compare", "--model", "tiny-pixart", "--prompts", prompts, "--n", "2", "--batch", "2"]
    base += ["--repeats", "1", "--steps", "4", "--plans", sched, "--out", tmp_path / "cmp", "--json"]
    assert _cli(*base).returncode == 0
    diffroute.Schedule.fora(arch, 4, 3).save(sched)
    _refused(_cli(*base), "plan", "schedule:")


def test_search_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "search"
    base = ["search", "--model", "tiny-pixart", "--prompt", "red apple", "--prompt", "cat", "--n", "2"]
    base += ["--pop", "4", "--generations", "1", "--steps", "4", "--out", out, "--json"]
    first = _cli(*base, "--quality", "psnr")
    assert first.returncode == 0, first.stderr
    _refused(_cli(*base, "--quality", "psnr", "--seed", "3"), "seed: 0 then, 3 now")
    _refused(_cli(*base, "--quality", "clip"), 'quality: "psnr" then, "clip" now')  # once a KeyError
    assert Path(out / "settings.json").is_file()


@pytest.mark.parametrize(
    "command",
    [
        ("generate", "--model", "emoji", "--plan", "emoji:l2c", "--steps", "10", "--prompt", "cat"),
        ("eval", "compare", "--model", "emoji", "--plans", "emoji:l2c", "--steps", "10", "--prompts", "heldout"),
        ("bench", "overhead", "--model", "emoji", "--plans", "emoji:l2c", "--steps", "10"),
    ],
)
def test_router_at_another_step_count_is_refused_before_the_model_loads(tmp_path, command):
    proc = _cli(*command, "--out", tmp_path / "out") if command[0] != "bench" else _cli(*command)
    _refused(proc, "trained for 20 steps, not 10")
    assert "it/s" not in proc.stderr and not (tmp_path / "out").exists()  # no denoising started, nothing written


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["generate", "--steps", "-5"]])
def test_help_and_argument_errors_load_no_torch(argv):
    """The README's promise: argument errors answer at once, since no heavy library loads before a command runs."""
    code = (
        "import sys\nfrom diffroute.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def _zoo_listing():
    return sorted((str(p.relative_to(WEIGHTS)), p.stat().st_size) for p in WEIGHTS.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "command, needle",
    [
        (("train", "l2c", "--lr", "nan"), "argument --lr: nan is out of range"),
        (("train", "elastic", "--backbone-lr", "-1"), "argument --backbone-lr"),
        (("train", "moe", "--lr", "0"), "argument --lr: 0 is out of range"),
        (("train", "fera", "--iters", "0"), "argument --iters: 0 is out of range"),
        (("train", "dtr", "--beta", "1.5"), "argument --beta"),
        (("train", "moe", "--router-loss", "inf"), "argument --router-loss"),
        (("train", "lora", "--rank", "200000"), "argument --rank"),
        (("train", "l2c", "--prompts-per-batch", "0"), "argument --prompts-per-batch"),
        (("search", "--pop", "1"), "argument --pop"),
        (
            ("train", "moe", "--ship", "emoji-clip"),
            "'emoji-clip' is a shipped model that `diffroute train moe` did not",
        ),
        (("train", "moe", "--ship", "emoji-elastic", "--replace"), "did not create; it is never replaced"),
        (("train", "moe", "--ship", "emoji-moe"), "exists; pass --replace"),
        (("train", "l2c", "--ship", ""), "--ship '': give a name"),
        (("train", "l2c", "--ship", "é"), "give a name of lowercase ASCII"),
        (("train", "l2c", "--ship", "fast"), "emoji:fast is a shipped schedule; a router of that name would shadow it"),
        (("train", "l2c", "--ship", "l2c"), "the shipped router emoji:l2c exists; pass --replace"),
        (("train", "elastic", "--finetune", "--ship", "elastic"), "exists; pass --replace"),
        (("search", "--ship", "fast=0.7"), "the shipped schedule emoji:fast exists; pass --replace"),
        (("search", "--ship", "l2c=0.7", "--replace"), "emoji:l2c is a shipped router"),
    ],
)
def test_train_and_search_refusals_touch_nothing(tmp_path, command, needle):
    before = _zoo_listing()
    _refused(_cli(*command, "--model", "emoji", "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists() and _zoo_listing() == before


@pytest.mark.parametrize("where", ["empty", "package", "foreign model"])
def test_run_folders_that_would_lose_data_are_refused(tmp_path, where):
    if where == "empty":
        out, needle = "", "--out is empty"
    elif where == "package":
        out, needle = WEIGHTS / "new-run", "inside the installed diffroute package"
    else:
        out, needle = tmp_path / "run", "already holds a model/ that no diffroute run there made"
        (out / "model").mkdir(parents=True)
        (out / "model" / "mine.txt").write_text("keep me")
    _refused(_cli("train", "plain", "--model", "emoji", "--iters", "1", "--out", out), needle)
    if where == "package":
        assert not (WEIGHTS / "new-run").exists()
    if where == "foreign model":
        assert (out / "model" / "mine.txt").read_text() == "keep me"


def test_two_runs_into_one_folder_at_once_are_refused(tmp_path):
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running training holds it
    try:
        proc = _cli("train", "l2c", "--model", "tiny-pixart", "--prompt", "cat", "--iters", "1", "--out", out)
        _refused(proc, "is being written by another run right now")
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_resumed_training_with_other_settings_is_refused(tmp_path):
    args = ["train", "l2c", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "2", "--prompt", "a red apple", "--prompt", "a cat", "--out", tmp_path / "run"]
    assert _cli(*args).returncode == 0
    router = (tmp_path / "run" / "router" / "diffusion_pytorch_model.safetensors").read_bytes()
    _refused(_cli(*args, "--lam", "0.5"), "lam: 0.001 then, 0.5 now", "give a new --out")
    _refused(_cli(*args[:-2], "--iters", "3", *args[-2:]), "iters: 2 then, 3 now")
    assert (tmp_path / "run" / "router" / "diffusion_pytorch_model.safetensors").read_bytes() == router
    assert _cli(*args).returncode == 0  # the same settings resume (here: nothing left to do)


@pytest.mark.parametrize("plan", ["fora-3", "emoji:l2c"])
def test_histogram_refuses_plans_without_per_image_compute_before_work(tmp_path, plan):
    proc = _cli("eval", "histogram", "--model", "emoji", "--plan", plan, "--n", "4", "--out", tmp_path / "h")
    _refused(proc, "is not one (it gives every image the same compute map)")
    assert "it/s" not in proc.stderr and not (tmp_path / "h").exists()


def test_generate_into_a_folder_another_run_is_writing_is_refused(tmp_path):
    import fcntl
    import os

    out = tmp_path / "gen"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        _refused(_cli(*GEN, "--out", out), "is being written by another run right now")
    finally:
        os.close(fd)
