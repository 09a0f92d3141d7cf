"""The `diffroute` command: help on every subcommand, a generation with JSON, and errors before any work."""

import json

import pytest
from conftest import run_cli

from diffroute.cli.main import COMMANDS


def _cli(*args, check=True):
    proc = run_cli(*args)  # in this process (see conftest.run_cli)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help(command):
    assert "usage: diffroute " + command in _cli(command, "--help").stdout


def test_generate_json(tmp_path):
    out = tmp_path / "gen"
    proc = _cli(
        "generate",
        "--model",
        "tiny-pixart",
        "--steps",
        "6",
        "--prompt",
        "red apple",
        "--prompt",
        "cat",
        "--out",
        str(out),
        "--json",
    )
    result = json.loads(proc.stdout)
    assert "RANDOM weights" in proc.stderr
    fora = result["plans"]["fora-3"]
    assert fora["computed_fraction"] == pytest.approx(2 / 6)  # steps 0 and 3 of 6
    assert fora["psnr_vs_full_db"] > 20 and fora["speedup_transformer"] > 0
    # medians of interleaved repeats, their spread and the FLOP-ideal speedup (fora-3 computes 2 of 6 steps' blocks)
    assert result["repeats"] == 3 and isinstance(result["timing_warnings"], list)
    assert fora["end_to_end_spread"] >= 0 and 1 < fora["flop_ideal_speedup"] < 3
    assert result["plans"]["full"]["flop_ideal_speedup"] == pytest.approx(1.0)
    assert sorted(p.name for p in (out / "fora-3").glob("*.png")) == ["000.png", "001.png"]
    assert (out / "grid.png").is_file() and json.loads((out / "summary.json").read_text())["steps"] == 6


def test_unknown_plan_fails_before_work(tmp_path):
    proc = _cli(
        "generate", "--model", "tiny-pixart", "--plan", "fast-please", "--out", str(tmp_path / "x"), check=False
    )
    assert proc.returncode == 2
    assert "Unknown plan 'fast-please'" in proc.stderr and "fora-N" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_missing_prompts_file(tmp_path):
    proc = _cli("generate", "--prompts-file", str(tmp_path / "nope.txt"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_generate_in_bf16_with_another_attention_and_compiled(tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--model", "tiny-pixart", "--steps", "4", "--prompt", "cat", "--out", str(out), "--json"]
    args += ["--dtype", "bfloat16", "--attention", "classic", "--compile", "regional"]
    result = json.loads(_cli(*args).stdout)
    runtime = {"device": "cpu", "dtype": "bfloat16", "attention": "classic", "compile": "regional"}
    assert (
        result["runtime"] == {**runtime, "threads": result["runtime"]["threads"]} and result["runtime"]["threads"] >= 1
    )
    assert result["plans"]["fora-3"]["computed_fraction"] == pytest.approx(2 / 4)  # steps 0 and 3 of 4
    assert (out / "fora-3" / "000.png").is_file()
