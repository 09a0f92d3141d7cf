"""A non-editable install works: the built wheel holds every subpackage and the shipped weights, data and schedules.

The wheel is installed into a fresh virtual environment whose dependencies come from the project's venv (a .pth
file, which does not run the editable finder of the project venv), and used from outside the checkout.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = {
    "diffroute": "diffroute",
    "pipelines": "diffroute.pipelines",
    "eval": "diffroute.eval",
    "app": "diffroute.app",
}


def _source_packages() -> set[str]:
    """Every folder with an __init__.py under the four source trees, as its installed dotted name."""
    found = set()
    for folder, name in SOURCE_FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a clean copy of the source, so that a stale build/ folder cannot hide a missing package."""
    src = tmp_path_factory.mktemp("src") / "diffroute"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "outputs", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, ignore=junk)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("diffroute-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel_env(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; the project venv's site-packages supply the dependencies."""
    env = tmp_path_factory.mktemp("env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return env


def test_wheel_contains_every_package_and_the_shipped_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {"/".join(n.split("/")[:-1]).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = _source_packages() - in_wheel
    assert not missing, f"packages missing from the wheel: {sorted(missing)}"
    for shipped in (
        "diffroute/zoo/data/emoji32.npz",
        "diffroute/zoo/weights/emoji/model_index.json",
        "diffroute/zoo/weights/emoji/diffroute.json",
        "diffroute/zoo/weights/emoji/teacache.json",
        "diffroute/zoo/weights/emoji/magcache.json",
        "diffroute/zoo/weights/emoji/transformer/diffusion_pytorch_model.safetensors",
        "diffroute/zoo/weights/emoji-clip/diffusion_pytorch_model.safetensors",
        "diffroute/zoo/weights/emoji/routers/l2c/config.json",
        "diffroute/zoo/weights/emoji/routers/l2c/diffusion_pytorch_model.safetensors",
        "diffroute/routers/l2c.py",
    ):
        assert shipped in names, shipped
    assert any(n.startswith("diffroute/zoo/weights/emoji/schedules/") and n.endswith(".json") for n in names)
    assert not any(n.split("/")[0] in ("eval", "app", "pipelines", "tests") for n in names), "top-level packages"


def test_installed_wheel_imports_and_runs_outside_the_checkout(wheel_env, tmp_path):
    python, cli = wheel_env / "bin" / "python", wheel_env / "bin" / "diffroute"
    code = (
        "import json, diffroute, diffroute.policies, diffroute.search, diffroute.eval, diffroute.app\n"
        "from diffroute.zoo.shipped import shipped_schedules\n"
        "from diffroute.zoo.emoji import WEIGHTS\n"
        "print(json.dumps({'file': diffroute.__file__, 'weights': str(WEIGHTS),"
        " 'schedules': sorted(shipped_schedules())}))\n"
    )
    proc = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert str(wheel_env) in info["file"], "imported the checkout instead of the installed wheel"
    assert str(wheel_env) in info["weights"]
    assert "emoji:fast" in info["schedules"]
    help_text = subprocess.run([str(cli), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0, help_text.stderr
    assert "generate" in help_text.stdout and "search" in help_text.stdout


def test_installed_wheel_generates_with_the_shipped_model(wheel_env, tmp_path):
    """The shipped emoji model and a shipped schedule are found inside the installed package and run."""
    proc = subprocess.run(
        [
            str(wheel_env / "bin" / "diffroute"),
            "generate",
            "--model",
            "emoji",
            "--plan",
            "emoji:fast",
            "--steps",
            "20",
            "--prompt",
            "grinning face",
            "--out",
            str(tmp_path / "gen"),
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert 0 < result["plans"]["emoji:fast"]["computed_fraction"] < 1
    assert list((tmp_path / "gen").rglob("*.png"))
