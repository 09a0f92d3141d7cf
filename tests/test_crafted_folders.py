"""Router and model-variant folders are untrusted: a config that asks for more than its weights hold, or a corrupt
weights file, is refused with one clear error before anything large is allocated."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli

from diffroute.zoo.emoji import WEIGHTS

LOADERS = {
    "router": "from diffroute.routers import load_router as load",
    "variant": "from diffroute.zoo.registry import load_transformer as load",
}
ROUTER, VARIANT = WEIGHTS / "emoji" / "routers" / "l2c", WEIGHTS / "emoji-moe" / "transformer"


def _set(**values):
    return lambda config: config.update(values)


def _set_moe(**values):
    return lambda config: config["diffroute_moe"].update(values)


def _truncate_weights(folder):
    (weights,) = folder.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])


# case: (kind, config edit, folder damage, what the refusal must say; None: it must load)
CASES = {
    "router-blocks": ("router", _set(num_blocks=100000), None, "does not match its weights"),
    "router-steps-huge": ("router", _set(num_steps=1e9), None, "out of any sane range"),
    "router-steps": ("router", _set(num_steps=7), None, "does not match its weights"),
    "router-nan-threshold": ("router", _set(threshold=float("nan")), None, "out of any sane range"),
    "router-truncated": ("router", None, _truncate_weights, "not a readable safetensors file"),
    "router-untouched": ("router", None, None, None),
    "variant-layers": ("variant", _set(num_layers=500), None, "does not match its weights"),
    "variant-time-dim": ("variant", _set_moe(time_dim=1_000_000), None, "does not match its weights"),
    "variant-experts-huge": ("variant", _set_moe(num_experts=10**9), None, "out of any sane range"),
    "variant-experts-text": ("variant", _set_moe(num_experts="six"), None, "corrupt"),
    "variant-truncated": ("variant", None, _truncate_weights, "not a readable safetensors file"),
    "variant-untouched": ("variant", None, None, None),
}

# One child process loads every crafted folder in turn (a process per folder spent ~8 s each starting Python and
# importing torch). Before each load it resets its own peak-memory mark (writing 5 to /proc/self/clear_refs resets
# VmHWM), so each case reports the peak of its own load, and an allocation cannot hide behind this test process.
_CHILD = """
import json, sys
for line in sys.stdin:
    case, kind, folder = json.loads(line)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    try:
        exec(LOADERS[kind]); load(folder)
        status = "LOADED"
    except ValueError as e:
        status = f"REFUSED {type(e).__name__} {e}"
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps([case, status, int(hwm) // 1024]), flush=True)
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[str, tuple[str, int]]:
    """Each case's outcome in the child: (LOADED or REFUSED + the error, peak MB of that load)."""
    lines = []
    for case, (kind, edit, damage, _) in CASES.items():
        folder = tmp_path_factory.mktemp(case) / "crafted"
        shutil.copytree(ROUTER if kind == "router" else VARIANT, folder)
        if edit is not None:
            config = json.loads((folder / "config.json").read_text())
            edit(config)
            (folder / "config.json").write_text(json.dumps(config))
        if damage is not None:
            damage(folder)
        lines.append(json.dumps([case, kind, str(folder)]))
    code = f"LOADERS = {LOADERS!r}\n" + _CHILD
    proc = subprocess.run(
        [sys.executable, "-c", code], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600
    )
    results = {c: (status, peak) for c, status, peak in map(json.loads, proc.stdout.splitlines())}
    assert set(results) == set(CASES), proc.stdout + proc.stderr
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_folder_is_refused_before_allocating_or_loads_untouched(loaded, case):
    status, peak = loaded[case]
    needle = CASES[case][3]
    if needle is None:
        assert status == "LOADED", status
    else:
        assert status.startswith("REFUSED") and needle in status, status
        assert peak < 2000, f"peak memory {peak} MB: something large was allocated before the refusal"


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from diffroute.metrics.images import load_uint8

    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    pixels = load_uint8([tmp_path / "g16.png"])[0, 0].numpy()
    assert np.array_equal(pixels, np.rint(ramp / 257).astype(np.uint8))  # PIL's convert("RGB") made 99.6% white


def test_a_broken_variant_json_in_the_zoo_is_skipped_with_a_warning(tmp_path, monkeypatch):
    import diffroute.zoo.emoji
    from diffroute.zoo import registry

    (tmp_path / "emoji-broken").mkdir()
    (tmp_path / "emoji-broken" / "variant.json").write_text("{ not json")
    monkeypatch.setattr(diffroute.zoo.emoji, "WEIGHTS", tmp_path)
    with pytest.warns(UserWarning, match="zoo variant 'emoji-broken' skipped"):
        registry._register_variants()
    assert "emoji-broken" not in registry.MODELS


@pytest.mark.parametrize("damage", ["pickled weights", "no transformer"])
def test_user_pipeline_folders_that_cannot_load_give_one_clear_error(tmp_path, damage):
    from diffroute.errors import InputError
    from diffroute.zoo import load_pipeline
    from diffroute.zoo.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["pixart-alpha"]()
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder, safe_serialization=damage != "pickled weights")
    if damage == "no transformer":
        shutil.rmtree(folder / "transformer")
    with pytest.raises(InputError, match="cannot be loaded as a diffusers pipeline"):
        load_pipeline(str(folder))


def test_a_damaged_checkpoint_is_refused_on_resume(tmp_path):
    args = ["train", "l2c", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "2", "--prompt", "a red apple", "--prompt", "a cat", "--out", str(tmp_path / "run")]
    assert run_cli(*args).returncode == 0
    (ckpt,) = (tmp_path / "run").glob("ckpt-*.safetensors")
    ckpt.write_bytes(b"garbage")
    proc = run_cli(*args)
    assert proc.returncode == 2 and "cannot be resumed" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_weights_are_never_saved_or_shipped(tmp_path, monkeypatch):
    import torch

    import diffroute.zoo.shipped
    from diffroute.errors import InputError
    from diffroute.routers.l2c import L2CRouter
    from diffroute.utils.checked_load import require_finite

    router = L2CRouter(num_steps=4, num_blocks=2, components=("attn1", "ff"), model_class="PixArtTransformer2DModel")
    with torch.no_grad():
        router.theta[1, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite values"):
        require_finite(router.state_dict(), "the router")
    router.save_pretrained(tmp_path / "nan-router")
    monkeypatch.setattr(diffroute.zoo.shipped, "WEIGHTS", tmp_path / "zoo")
    with pytest.raises(InputError, match="training diverged"):
        diffroute.zoo.shipped.install_router(tmp_path / "nan-router", "emoji", "nan")
    assert not (tmp_path / "zoo").exists()


def test_run_outputs_follow_the_umask(tmp_path):
    import os
    import stat

    args = ["train", "l2c", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "2", "--prompt", "a red apple", "--prompt", "a cat", "--out", str(tmp_path / "run")]
    code = "import os, sys; os.umask(0o022); from diffroute.cli.main import main; main(sys.argv[1:])"
    assert subprocess.run([sys.executable, "-c", code, *args], capture_output=True).returncode == 0
    files = [*(tmp_path / "run").glob("ckpt-*.safetensors"), *(tmp_path / "run" / "router").iterdir()]
    assert files and all(stat.S_IMODE(os.stat(p).st_mode) == 0o644 for p in files)
