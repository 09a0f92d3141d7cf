"""FeRA and its LoRA baseline: identity at initialisation and bitwise enable/disable on all six families, a band
indicator that is not constant on small latents, per-call routing weights, save and load."""

import numpy as np
import pytest
import torch
from conftest import NAMES, fresh_pipe, prompts, run, run_cli

from diffroute.errors import PlanError
from diffroute.surgery.fera import (
    adapter_parameters,
    apply_fera,
    apply_lora,
    band_energies,
    disable_fera,
    enable_fera,
    frequency_bands,
    last_routing_weights,
    set_lora_enabled,
)
from diffroute.surgery.loader import from_pretrained


def _randomise_lora(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5, generator=gen)


@pytest.mark.parametrize("name", NAMES)
def test_fera_is_the_model_at_initialisation_and_switches_off_bitwise(name):
    pipe = fresh_pipe(name)
    ref = run(pipe, name, prompts(name), [0, 1])
    apply_fera(pipe.transformer)
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1]), ref)  # B = 0: the experts add nothing
    _randomise_lora(pipe.transformer)
    adapted = run(pipe, name, prompts(name), [0, 1])
    assert np.abs(adapted - ref).max() > 1e-4
    disable_fera(pipe.transformer)
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1]), ref)
    enable_fera(pipe.transformer)
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1]), adapted)


def test_band_indicator_separates_smooth_from_noisy_small_latents():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.sin(xx / 3 + yy / 5).expand(1, 4, 8, 8)
    torch.testing.assert_close(sum(frequency_bands(noise)), noise)  # the bands add up to the latent
    e_noise, e_smooth = band_energies(noise)[0], band_energies(smooth)[0]
    assert e_noise.sum() == pytest.approx(1.0) and e_smooth.sum() == pytest.approx(1.0)
    assert e_noise[0] > 0.3 and e_smooth[0] < 0.05  # high band: most of noise's energy, little of a smooth field
    assert e_smooth[-1] > 0.5  # low band: most of the smooth field's


def test_routing_weights_are_per_call_per_sample_and_cleared():
    pipe = fresh_pipe("pixart-alpha")
    router = apply_fera(pipe.transformer, num_experts=3)
    with torch.no_grad():  # a router that reads the energies strongly, with no bias towards an expert
        gen = torch.Generator().manual_seed(3)
        router.mlp[0].weight.normal_(0, 3.0, generator=gen)
        router.mlp[2].weight.normal_(0, 0.3, generator=gen)
        router.mlp[0].bias.zero_()
        router.mlp[2].bias.zero_()
    state = pipe.transformer._diffroute_fera["state"]
    state.record = True
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=4)
    assert state.weights is None and len(state.history) == 4  # one call per step (CFG batched), cleared after each
    w = torch.stack(state.history)  # [steps, 2 prompts x 2 CFG rows, experts]
    assert w.shape == (4, 4, 3)
    t = torch.stack(state.timesteps)  # the timestep of each row, falling from the noisy end
    assert t.shape == (4, 4) and (t[:-1, 0] > t[1:, 0]).all() and (t == t[:, :1]).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 4))
    torch.testing.assert_close(w[:, :2], w[:, 2:])  # CFG rows see the same latent: aligned weights
    # the tiny random model's latents stay noise at every step; a smooth latent (the clean end) routes elsewhere
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.sin(xx / 3 + yy / 5).expand(1, 4, 8, 8)
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (router(smooth) - router(noisy)).abs().max() > 0.05
    with pytest.raises(PlanError, match="adapters already"):
        apply_lora(pipe.transformer)


def test_lora_baseline_switches_off_bitwise_and_counts_parameters():
    pipe = fresh_pipe("pixart-alpha")
    ref = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    apply_lora(pipe.transformer, rank=12)
    _randomise_lora(pipe.transformer)
    assert np.abs(run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1]) - ref).max() > 1e-4
    set_lora_enabled(pipe.transformer, False)
    assert np.array_equal(run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1]), ref)
    lora = sum(p.numel() for p in adapter_parameters(pipe.transformer))
    fera_pipe = fresh_pipe("pixart-alpha")
    apply_fera(fera_pipe.transformer, num_experts=3, rank=4)
    fera = adapter_parameters(fera_pipe.transformer)
    router = sum(p.numel() for p in fera_pipe.transformer.fera_router.parameters())
    assert sum(p.numel() for p in fera) - router == lora  # 3 experts of rank 4 = one LoRA of rank 12


def test_fera_with_uniform_routing_and_alpha_matched_is_one_lora_of_all_the_experts():
    from peft.tuners.lora import LoraLayer

    ps = prompts("pixart-alpha")
    lora_pipe = fresh_pipe()
    apply_lora(lora_pipe.transformer, rank=6, alpha=3.0)
    outputs = {}
    for alpha in (3.0, 1.0):
        pipe = fresh_pipe()
        router = apply_fera(pipe.transformer, num_experts=3, rank=2, alpha=alpha)
        with torch.no_grad():
            router.mlp[2].weight.zero_()  # a constant router: weight 1/3 for each expert
            router.mlp[2].bias.zero_()
        _randomise_lora(pipe.transformer)
        outputs[alpha] = run(pipe, "pixart-alpha", ps, [0, 1])
    with torch.no_grad():  # the rank-6 LoRA: the experts' A stacked, their B side by side
        for name, module in lora_pipe.transformer.named_modules():
            if isinstance(module, LoraLayer):
                fera = pipe.transformer.get_submodule(name)
                module.lora_A["lora"].weight.copy_(torch.cat([fera.lora_A[f"fera_{e}"].weight for e in range(3)], 0))
                module.lora_B["lora"].weight.copy_(torch.cat([fera.lora_B[f"fera_{e}"].weight for e in range(3)], 1))
    lora = run(lora_pipe, "pixart-alpha", ps, [0, 1])
    assert np.abs(outputs[3.0] - lora).max() < 1e-5  # alpha = E: the mixture at 1/E each is LoRA-E.r exactly
    assert np.abs(outputs[1.0] - lora).max() > 1e-4  # the paper's alpha = 1: a third of that update


def test_balance_loss_is_zero_for_equal_use_and_pushes_away_from_collapse():
    from diffroute.training.adapters import balance_loss

    assert float(balance_loss(torch.full((4, 3), 1 / 3))) == pytest.approx(0, abs=1e-6)
    assert float(balance_loss(torch.eye(3))) == pytest.approx(0, abs=1e-6)  # sharp per sample, equal on average
    assert float(balance_loss(torch.tensor([[1.0, 0, 0]] * 4))) == pytest.approx(2)  # E - 1: one expert takes all
    logits = torch.tensor([[2.0, 0, 0]] * 4, requires_grad=True)
    balance_loss(torch.softmax(logits, -1)).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()  # descent lowers the favoured expert


def test_last_routing_weights_keep_their_graph_for_a_training_loss():
    from diffroute.training.adapters import balance_loss

    pipe = fresh_pipe()
    router = apply_fera(pipe.transformer)
    with pytest.raises(PlanError, match="routed no call"):
        last_routing_weights(pipe.transformer)
    recorded = {}
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: recorded.setdefault("call", (a, k)), with_kwargs=True
    )
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=1)
    handle.remove()
    args, kwargs = recorded["call"]
    pipe.transformer(*args, **kwargs)  # with grad, as in training
    w = last_routing_weights(pipe.transformer)
    assert pipe.transformer._diffroute_fera["state"].weights is None  # cleared for the layers, kept for the loss
    torch.testing.assert_close(w, router(kwargs.get("hidden_states", args[0] if args else None)))
    balance_loss(w).backward()
    assert router.mlp[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("which", ["fera", "lora"])
def test_fera_and_lora_save_and_load_with_the_transformer(tmp_path, which):
    pipe = fresh_pipe("pixart-alpha")
    (apply_fera if which == "fera" else apply_lora)(pipe.transformer)
    _randomise_lora(pipe.transformer)
    ref = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    pipe.transformer.save_pretrained(tmp_path / "t")
    loaded = from_pretrained(tmp_path / "t")
    pipe.register_modules(transformer=loaded)
    assert np.array_equal(run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1]), ref)


def test_fecl_is_zero_when_the_update_matches_the_error_spectrum_and_positive_otherwise():
    from diffroute.surgery.fera import SIGMAS
    from diffroute.training.adapters import fecl_loss

    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    base = torch.randn(2, 4, 8, 8, generator=gen)
    pred = base + 0.5 * (target - base)  # the update is a scaled copy of the remaining error: same band shares
    assert fecl_loss(pred, base, target, SIGMAS) < 1e-10
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.sin(xx / 3 + yy / 5).expand(2, 4, 8, 8)
    assert fecl_loss(base + smooth, base, target, SIGMAS) > 1e-3  # a low-band update against a white-noise error


def test_train_fera_cli_adapts_only_the_adapters_on_symbola(tmp_path):
    import json

    from diffroute.zoo.registry import load_pipeline, model_domain

    args = ["train", "fera", "--model", "emoji", "--iters", "2", "--batch-size", "4", "--train-images", "8"]
    args += ["--ema-decay", "0", "--alpha", "3", "--balance", "0.01", "--out", str(tmp_path / "r"), "--json"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["domain"] == "symbola" and result["trained_parameters"] > 0
    assert result["alpha"] == 3.0 and result["balance"] == 0.01
    log = [json.loads(line) for line in (tmp_path / "r" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # short runs log every step, with the router's mean weights
    for r in log:
        assert sum(r[f"weight_{e}"] for e in range(3)) == pytest.approx(1, abs=1e-4)
        assert r["balance"] >= 0 and r["fecl"] >= 0
    from diffroute.eval.adapter_report import trained_parameters

    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["trained_parameters"] == result["trained_parameters"] == trained_parameters(tmp_path / "r" / "model")
    assert model_domain(str(tmp_path / "r" / "model")) == "symbola"
    adapted, shipped = load_pipeline(str(tmp_path / "r" / "model")).transformer, load_pipeline("emoji").transformer
    assert adapted.config["diffroute_fera"]["alpha"] == 3.0
    base = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    for k, v in shipped.state_dict().items():  # the base weights did not move
        assert torch.equal(base[k], v), k
    assert any(v.abs().sum() > 0 for k, v in adapted.state_dict().items() if ".lora_B." in k)  # B left zero
