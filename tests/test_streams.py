"""DAR and DTR, the residual-stream rewrites: DAR's retrofit is the pretrained model at initialisation on all six
families, both detach bitwise, DTR's windows follow the paper, and both save and load with the transformer."""

import numpy as np
import pytest
import torch
from conftest import NAMES, fresh_pipe, prompts, run, run_cli

from diffroute.errors import PlanError
from diffroute.surgery.dar import DARAggregator, apply_dar, remove_dar
from diffroute.surgery.dtr import apply_dtr, dtr_masks, remove_dtr
from diffroute.surgery.loader import from_pretrained, is_modified_folder


@pytest.mark.parametrize("name", NAMES)
def test_dar_retrofit_is_the_model_at_initialisation_and_detaches_bitwise(name):
    pipe = fresh_pipe(name)
    ref = run(pipe, name, prompts(name), [0, 1])
    aggregator = apply_dar(pipe.transformer, "retrofit", "static+t")
    np.testing.assert_allclose(run(pipe, name, prompts(name), [0, 1]), ref, atol=5e-6)
    with torch.no_grad():
        aggregator.queries.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    assert np.abs(run(pipe, name, prompts(name), [0, 1]) - ref).max() > 1e-3  # the weights really route
    remove_dar(pipe.transformer)
    assert "diffroute_dar" not in pipe.transformer.config and not hasattr(pipe.transformer, "dar")
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1]), ref)


def test_dar_scratch_mode_averages_and_timestep_injection_trains():
    agg = DARAggregator(dim=8, num_blocks=2, mode="scratch", query="static+t")
    v = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    t = torch.tensor([100.0, 900.0])
    torch.testing.assert_close(agg(2, v, t), sum(v) / 3)  # zero queries: uniform weights, a plain average
    agg.record = True
    agg(2, v, t).square().sum().backward()
    assert agg.time_in.weight.grad.abs().sum() > 0 and agg.queries.grad[2].abs().sum() > 0
    assert agg.weights[0]["alpha"] == pytest.approx([1 / 3] * 3)
    with pytest.raises(PlanError, match="query one of"):
        DARAggregator(dim=8, num_blocks=2, query="sideways")


def test_dtr_windows_follow_the_paper():
    masks = dtr_masks(torch.tensor([0.0, 500.0, 999.0]), 192)  # beta 0.8, alpha 4: 153 channels, starts 0..39
    assert masks.sum(1).tolist() == [153.0] * 3
    starts = masks.argmax(1).tolist()
    assert starts == [0, round((500 / 999) ** 4 * 39), 39]


def test_dtr_changes_the_model_full_window_is_identity_and_detaches():
    pipe = fresh_pipe("pixart-alpha")
    name = "pixart-alpha"
    ref = run(pipe, name, prompts(name), [0, 1])
    apply_dtr(pipe.transformer, beta=1.0)
    np.testing.assert_allclose(run(pipe, name, prompts(name), [0, 1]), ref, atol=2e-6)
    remove_dtr(pipe.transformer)
    apply_dtr(pipe.transformer)
    assert np.abs(run(pipe, name, prompts(name), [0, 1]) - ref).max() > 1e-3
    with pytest.raises(PlanError, match="applied to this transformer already"):
        apply_dtr(pipe.transformer)
    remove_dtr(pipe.transformer)
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1]), ref)


@pytest.mark.parametrize("which", ["dar", "dtr"])
def test_dar_and_dtr_save_and_load_with_the_transformer(tmp_path, which):
    pipe = fresh_pipe("pixart-alpha")
    name = "pixart-alpha"
    if which == "dtr":
        apply_dtr(pipe.transformer, beta=0.75)
        with pytest.raises(PlanError, match="one at a time"):
            apply_dar(pipe.transformer)
    else:
        aggregator = apply_dar(pipe.transformer, "scratch", "dynamic")
        with torch.no_grad():
            aggregator.dynamic.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    ref = run(pipe, name, prompts(name), [0, 1])
    pipe.transformer.save_pretrained(tmp_path / "t")
    assert is_modified_folder(tmp_path / "t")
    loaded = from_pretrained(tmp_path / "t")
    if which == "dtr":
        assert loaded.config["diffroute_dtr"] == {"beta": 0.75, "alpha": 4.0}
    else:
        assert loaded.dar.config.mode == "scratch" and loaded.dar.config.query == "dynamic"
    pipe.register_modules(transformer=loaded)
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1]), ref)


def test_train_dar_from_the_cli_and_load_back_with_snapshots(tmp_path):
    import json

    from diffroute.zoo.registry import load_pipeline

    args = ["train", "dar", "--model", "emoji", "--iters", "2", "--batch-size", "4", "--train-images", "8"]
    args += ["--ema-decay", "0", "--snapshots", "2", "--out", str(tmp_path / "r"), "--json"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["method"] == "dar" and result["init"] == "shipped" and result["mode"] == "retrofit"
    pipe = load_pipeline(str(tmp_path / "r" / "model"))
    assert pipe.transformer.dar.config.mode == "retrofit" and pipe.transformer.dar.queries.abs().sum() > 0
    # the learning-curve snapshots: one per step here; the last is the final model, the first is not
    snaps = sorted(p.name for p in (tmp_path / "r" / "snapshots").iterdir())
    assert snaps == ["step-000001", "step-000002"]
    final = pipe.transformer.state_dict()
    for snap, same in zip(snaps, (False, True), strict=True):
        loaded = load_pipeline(str(tmp_path / "r" / "snapshots" / snap)).transformer.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in final.items()) == same


def test_from_scratch_starts_from_fresh_seeded_weights_with_the_rewrite():
    from diffroute.training.configs import StreamConfig
    from diffroute.training.streams import prepare
    from diffroute.zoo.registry import load_pipeline

    shipped = load_pipeline("emoji").transformer.pos_embed.proj.weight
    a, b = load_pipeline("emoji"), load_pipeline("emoji")
    ta = prepare(a, StreamConfig(method="dtr", init="scratch", seed=1))
    tb = prepare(b, StreamConfig(method="dtr", init="scratch", seed=1))
    assert a.transformer is ta and ta.config["diffroute_dtr"] == {"beta": 0.8, "alpha": 4.0}
    assert not torch.allclose(ta.pos_embed.proj.weight, shipped)
    assert all(torch.equal(x, y) for x, y in zip(ta.parameters(), tb.parameters(), strict=True))  # seeded
    with pytest.raises(PlanError, match="DTR"):
        prepare(load_pipeline("emoji"), StreamConfig(method="dtr", beta=1.5))


@pytest.mark.parametrize("which", ["dar", "dtr"])
def test_stream_rewrites_run_per_step_plans_and_refuse_per_sample_block_plans(which):
    pipe = fresh_pipe("pixart-alpha")
    (apply_dar if which == "dar" else apply_dtr)(pipe.transformer)
    pipe.enable_cache("fora-2")  # per step: every row runs or reuses together
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    assert pipe.last_stats.computed_fraction < 1
    pipe.enable_cache("dbcache-F1B0-0.1")  # per sample: a block runs on some rows only
    with pytest.raises(PlanError, match="per-step plan"):
        run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
