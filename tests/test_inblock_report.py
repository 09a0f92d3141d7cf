"""The in-block routing reports: FeRA's weights against t, DAR's aggregation weights, the DAR/DTR table and its
targets, and `eval adapt|streams` refusing unfinished runs."""

import json

import numpy as np
import pytest
import torch
from conftest import CALL_KWARGS, fresh_pipe

from diffroute.eval.adapter_report import (
    fera_weights_by_t,
    plot_training_weights,
    plot_weights,
    read_train_log,
    run_label,
)
from diffroute.eval.stream_report import dar_weights, evaluated_steps, stream_table
from diffroute.surgery.dar import apply_dar
from diffroute.surgery.fera import apply_fera

STEPS = 4
PROMPTS = ["a red apple", "a smiling cat", "a blue car"]
KWARGS = CALL_KWARGS["pixart-alpha"]


def test_fera_weights_by_timestep(tmp_path):
    pipe = fresh_pipe()
    router = apply_fera(pipe.transformer, num_experts=3)
    with torch.no_grad():  # a router that reads the energies strongly
        router.mlp[0].weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(3))
        router.mlp[2].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    data = fera_weights_by_t(pipe, PROMPTS, batch=2, steps=STEPS, call_kwargs=KWARGS)
    assert len(data["t"]) == STEPS and data["t"] == sorted(data["t"], reverse=True)
    mean, lo, hi = (np.array(data[k]) for k in ("mean", "p10", "p90"))
    assert mean.shape == (STEPS, 3)
    np.testing.assert_allclose(mean.sum(1), 1, rtol=1e-5)
    assert (lo <= mean + 1e-6).all() and (mean <= hi + 1e-6).all()
    assert data["change_over_t"] == pytest.approx(float((mean.max(0) - mean.min(0)).max()))
    state = pipe.transformer._diffroute_fera["state"]
    assert not state.record and state.history == [] and state.timesteps == []
    assert plot_weights({"a": data, "b": data}, tmp_path).stat().st_size > 0
    assert json.loads((tmp_path / "weights.json").read_text())["b"]["mean"] == data["mean"]


def test_training_weights_plot_reads_the_logged_router_weights(tmp_path):
    log = tmp_path / "train" / "log.jsonl"
    log.parent.mkdir()
    records = [{"step": s, "loss": 0.1, "weight_0": 0.3 + s / 100, "weight_1": 0.7 - s / 100} for s in (10, 20, 30)]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_train_log(tmp_path) == records and read_train_log(tmp_path / "none") == []
    assert plot_training_weights({"FeRA": read_train_log(tmp_path)}, tmp_path).stat().st_size > 0
    with pytest.raises(KeyError):  # a log without the step numbers is refused, not drawn empty
        plot_training_weights({"FeRA": [{"weight_0": 1.0}]}, tmp_path)


def test_run_labels_name_the_settings_that_differ_from_the_defaults():
    fera = {"method": "fera", "num_experts": 3, "rank": 4}
    assert run_label({**fera, "alpha": 1.0, "balance": 0.0}) == "FeRA 3x r4"
    assert run_label({**fera, "alpha": 3.0, "balance": 0.01}) == "FeRA 3x r4, alpha 3, balance 0.01"
    assert run_label({**fera, "alpha": 1.0, "fecl": 0.0}) == "FeRA 3x r4, FECL 0"
    assert run_label({"method": "lora", "num_experts": 1, "rank": 12, "alpha": 3.0}) == "LoRA r12"
    assert run_label({"method": "lora", "num_experts": 1, "rank": 12, "alpha": 12.0}) == "LoRA r12, alpha 12"


def test_dar_weights_are_uniform_at_initialisation_and_follow_the_queries(tmp_path):
    pipe = fresh_pipe()
    agg = apply_dar(pipe.transformer)
    data = dar_weights(pipe, PROMPTS[:2], tmp_path / "init", batch=2, steps=STEPS, call_kwargs=KWARGS)
    points = data["relative_weight"]
    assert sorted(points, key=int) == [str(p) for p in range(3)]  # before each of 2 blocks, and after the last
    for p, rel in points.items():
        assert np.array(rel).shape == (int(p) + 1, STEPS)
        np.testing.assert_allclose(rel, 1, rtol=1e-5)  # zero queries: the plain residual sum's shares
    with torch.no_grad():  # the final point leans on the patch embedding against block outputs
        agg.queries[2] = 0
        agg.queries[1] = 0
        agg.time_in.bias.view(3, -1)[2] += torch.randn(agg.queries.shape[1], generator=torch.Generator().manual_seed(0))
    data = dar_weights(pipe, PROMPTS[:2], tmp_path, batch=2, steps=STEPS, call_kwargs=KWARGS)
    final = np.array(data["relative_weight"]["2"])
    np.testing.assert_allclose(final.mean(0), 1, rtol=1e-5)  # alpha sums to one: its mean relative weight is 1
    assert np.abs(final - 1).max() > 0.01
    assert set(data["received"]) == {"patch embedding", "block 1", "block 2"}
    assert data["lowest"][0] == min(data["received"], key=data["received"].get)
    by_step = np.array(data["received_by_step"])  # [timesteps, sources]: what the skip schedules read
    assert by_step.shape == (STEPS, 3)
    np.testing.assert_allclose(by_step.mean(0), list(data["received"].values()))
    np.testing.assert_allclose(by_step[:, 2], final[2])  # the last block's output is read by the final point only
    assert (tmp_path / "alpha.png").stat().st_size > 0 and not agg.record


def _fake_run(root, name, method, init, seed, iters, fds: dict):
    run = root / name
    run.mkdir()
    summary = {"method": method, "init": init, "seed": seed, "iters": iters, "mode": "scratch"}
    (run / "summary.json").write_text(json.dumps(summary))
    for step, fd in fds.items():
        folder = run / ("compare" if step == iters else f"compare-{step:06d}")
        folder.mkdir()
        full = {"fd_vs_real": fd, "fd_vs_real_ci95": [fd - 0.1, fd + 0.1], "clip_score": 20.0}
        (folder / "results.json").write_text(json.dumps({"plans": {"full": full}}))
    return run


def test_stream_table_reads_each_evaluated_step_and_checks_the_targets(tmp_path):
    plain = _fake_run(tmp_path, "plain", "plain", "scratch", 0, 600, {300: 0.9, 600: 0.6})
    dar = _fake_run(tmp_path, "dar", "dar", "scratch", 0, 600, {300: 0.55, 600: 0.4})
    dtr = _fake_run(tmp_path, "dtr", "dtr", "scratch", 0, 600, {600: 0.7})
    assert list(evaluated_steps(dar)) == [300, 600]
    result = stream_table([plain, dar, dtr], tmp_path / "out")
    t = result["targets"]
    assert t["scratch seed 0: dar_half_steps_vs_plain"] == {"fd": 0.55, "plain_fd": 0.6, "met": True}
    assert t["scratch seed 0: dtr_vs_plain"]["met"] is False
    assert len(result["rows"]) == 5 and (tmp_path / "out" / "curves.png").stat().st_size > 0
    assert "| DAR (scratch) | 0 | 300 / 600 | 0.550 |" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.parametrize("command", ["adapt", "streams"])
def test_reports_refuse_unfinished_runs_before_any_work(tmp_path, capsys, command):
    from diffroute.cli.main import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", command, str(run), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "diffroute eval compare" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_skip_schedules_need_a_dar_run_and_are_checked_before_any_work(tmp_path, capsys):
    from diffroute.cli.main import main

    plain = _fake_run(tmp_path, "plain", "plain", "scratch", 0, 600, {600: 0.6})
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "streams", str(plain), "--skip-schedules", "2", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "give --dar" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
