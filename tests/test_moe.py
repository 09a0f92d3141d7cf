"""Expert-choice MoE: slice upcycling equals the dense model at full capacity on all six families, the inverse
restores it bitwise, a sample's output does not depend on its batch-mates, FLOPs follow capacity, capacity follows
the timestep, the upcycled transformer saves and loads, and caching plans still hook it."""

import numpy as np
import pytest
import torch
from conftest import NAMES, prompts, run, run_cli
from torch.utils.flop_counter import FlopCounterMode

import diffroute
from diffroute.core.arch import architecture_map
from diffroute.errors import InputError, PlanError
from diffroute.surgery.loader import from_pretrained, is_modified_folder
from diffroute.surgery.moe import moe_layers, parse_capacity, remove_moe, upcycle_moe
from diffroute.zoo.tiny import TINY_PIPELINES

# Routed + shared slices must divide each tiny FFN's hidden units (Sana's GLUMBConv has 20).
COUNTS = {"sana": (4, 1)}


def _upcycle(pipe, name, capacity=None, **kw):
    experts, shared = COUNTS.get(name, (6, 2))
    n = architecture_map(pipe.transformer).num_blocks
    kw = {"blocks": list(range(n)), **kw}
    return upcycle_moe(pipe.transformer, experts, shared, capacity=capacity or f"static:{experts}", **kw)


@pytest.fixture
def fresh():
    def make(name):
        pipe = TINY_PIPELINES[name]()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.mark.parametrize("name", NAMES)
def test_full_capacity_equals_dense_and_remove_restores_bitwise(fresh, name):
    pipe = fresh(name)
    ref = run(pipe, name, prompts(name), [0, 1])
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    layers = _upcycle(pipe, name, router_init_std=0.0)  # gate 2*sigmoid(0) = 1: the dense FFN
    assert len(layers) == architecture_map(pipe.transformer).num_blocks
    full = run(pipe, name, prompts(name), [0, 1])
    np.testing.assert_allclose(full, ref, atol=2e-5)
    for layer in layers:  # below full capacity the layer really drops work
        layer.capacity = parse_capacity("static:1")
    sparse = run(pipe, name, prompts(name), [0, 1])
    assert np.abs(sparse - ref).max() > 1e-3
    remove_moe(pipe.transformer)
    state = pipe.transformer.state_dict()
    assert set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    assert "diffroute_moe" not in pipe.transformer.config
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1]), ref)


def test_training_starts_from_the_dense_model(fresh):
    """With the configuration that trains (MoEConfig's defaults), the upcycled model at step 0 (dense_mix 1, full
    capacity) gives the dense model's images; the router penalty is 0 there and pulls towards it."""
    from diffroute.training.configs import MoEConfig
    from diffroute.training.moe import dense_mix, prepare

    name = "pixart-alpha"
    pipe = fresh(name)
    ref = run(pipe, name, prompts(name), [0, 1])
    cfg = MoEConfig()
    layers = moe_layers(prepare(pipe.transformer, cfg))
    assert layers and dense_mix(cfg, 0, 100) == 1.0
    for layer in layers:
        layer.dense_mix = dense_mix(cfg, 0, 100)
    np.testing.assert_allclose(run(pipe, name, prompts(name), [0, 1]), ref, atol=2e-5)
    layer = layers[0]
    layer.train()
    layer.set_timestep(torch.tensor([500.0]))
    layer(torch.randn(1, 16, layer.config.dim))
    assert float(layer.last_router_loss) == 0.0  # minimal at the dense gates (a softmax z-loss would not be)


@pytest.mark.parametrize("name", NAMES)
def test_a_samples_output_does_not_depend_on_its_batch_mates(fresh, name):
    pipe = fresh(name)
    experts = COUNTS.get(name, (6, 2))[0]
    _upcycle(pipe, name, capacity=f"clean:1-{experts / 2:g}", router_init_std=0.5)
    both = run(pipe, name, prompts(name), [0, 1])
    alone = run(pipe, name, prompts(name)[:1], [0])
    np.testing.assert_allclose(both[:1], alone, atol=1e-5)


def test_flops_follow_capacity():
    pipe = TINY_PIPELINES["pixart-alpha"]()
    (layer,) = upcycle_moe(pipe.transformer, 6, 2, blocks=[1])
    x = torch.randn(4, 64, layer.config.dim)
    flops = {}
    for k in (1, 2, 4, 6):
        layer.capacity = parse_capacity(f"static:{k}")
        layer.set_timestep(torch.full((4,), 500.0))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            layer(x)
        expert_flops = counter.get_total_flops()
        flops[k] = expert_flops
    dense = flops[6]
    for k in (1, 2, 4):
        # shared 2 slices + k routed slices per token, of 8: the matmul FLOPs (router and gather aside) scale so
        share = flops[k] / dense
        assert abs(share - (2 + k) / 8) < 0.05, (k, share)


@pytest.mark.parametrize("name", ["pixart-alpha", "flux"])  # FLUX passes t / 1000: the call context scales it
def test_capacity_follows_the_timestep_and_is_recorded(fresh, name):
    pipe = fresh(name)
    layers = _upcycle(pipe, name, capacity="clean:1-5")
    for layer in layers:
        layer.record = True
    run(pipe, name, prompts(name), [0, 1])
    stats = layers[0].stats
    assert len(stats) == (12 if name == "flux" else 6)  # one call per step (CFG batched; FLUX's true CFG: two)
    loads = [s["load"][0] for s in stats]
    assert loads == sorted(loads) and loads[-1] > loads[0]  # more capacity as t falls towards the clean end
    t = [s["t_frac"][0] for s in stats]
    assert t == sorted(t, reverse=True) and t[0] > 0.5  # the scheduler's units: the first step is noisy
    assert all(0 <= d <= 1 for s in stats for d in s["dropped"])


def test_router_gets_a_gradient_from_tokens_picked_by_one_expert(fresh):
    pipe = fresh("pixart-alpha")
    (layer,) = upcycle_moe(pipe.transformer, 6, 2, blocks=[1], capacity="static:1", router_init_std=0.3)
    layer.train()
    layer.set_timestep(torch.tensor([300.0, 700.0]))
    x = torch.randn(2, 16, layer.config.dim)
    layer(x).square().mean().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.last_router_loss is not None and layer.last_router_loss > 0


def test_save_pretrained_and_load_back(fresh, tmp_path):
    pipe = fresh("pixart-alpha")
    _upcycle(pipe, "pixart-alpha", capacity="noise:1-3", router_init_std=0.3)
    ref = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    pipe.transformer.save_pretrained(tmp_path / "t")
    assert is_modified_folder(tmp_path / "t")
    loaded = from_pretrained(tmp_path / "t")
    assert str(moe_layers(loaded)[0].capacity) == "noise:1-3"
    pipe.transformer = loaded
    pipe.register_modules(transformer=loaded)
    assert np.array_equal(run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1]), ref)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="not a transformer folder"):
        from_pretrained(tmp_path / "bad")


def test_caching_plans_still_hook_the_upcycled_model(fresh):
    pipe = fresh("pixart-alpha")
    _upcycle(pipe, "pixart-alpha", capacity="static:2", router_init_std=0.3)
    vanilla = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    pipe.enable_cache("full")
    assert np.array_equal(run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1]), vanilla)
    pipe.enable_cache("fora-2")
    cached = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    stats = pipe.last_stats
    assert stats.computed_fraction < 0.75 and not np.array_equal(cached, vanilla)
    pipe.disable_cache()


def test_bad_settings_are_refused_before_any_work(fresh):
    pipe = fresh("pixart-alpha")
    with pytest.raises(PlanError, match="not divisible"):
        upcycle_moe(pipe.transformer, 5, 2)
    with pytest.raises(PlanError, match="not understood"):
        upcycle_moe(pipe.transformer, 6, 2, capacity="lots")
    with pytest.raises(PlanError, match="must lie in"):
        upcycle_moe(pipe.transformer, 6, 2, capacity="static:7")
    with pytest.raises(PlanError, match="does not exist"):
        upcycle_moe(pipe.transformer, 6, 2, blocks=[9])
    upcycle_moe(pipe.transformer, 6, 2)
    with pytest.raises(PlanError, match="upcycled already"):
        upcycle_moe(pipe.transformer, 6, 2)
    layer = moe_layers(pipe.transformer)[0]
    layer._t_frac = None
    with pytest.raises(PlanError, match="needs the timestep"):
        layer(torch.randn(1, 4, layer.config.dim))


def _tiny_nucleus():
    from diffusers import NucleusMoEImageTransformer2DModel

    torch.manual_seed(0)
    model = NucleusMoEImageTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
        dense_moe_strategy="leave_first_block_dense",
        num_experts=4,
        moe_intermediate_dim=16,
        capacity_factors=4.0,
        mlp_ratio=12.0,  # the dense first block's FFN width rounds down to a multiple of 128: 128, not 0
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises some projections; make every path matter
        for param in model.parameters():
            param.normal_(0, 0.3)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 8, generator=gen),
        img_shapes=[(1, 4, 4)] * 2,
        encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
    )
    return model, inputs


def test_nucleus_capacity_follows_the_schedule_and_caching_plans_hook_it():
    from diffroute.core.executor import Executor
    from diffroute.surgery.moe import drive_nucleus_capacity, undrive_nucleus_capacity

    model, inputs = _tiny_nucleus()
    layer = model.transformer_blocks[1].img_mlp
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.capacity_factor))
    ts = [torch.full((2,), 0.9), torch.full((2,), 0.2)]
    with torch.no_grad():
        dense = [model(**inputs, timestep=t).sample for t in ts]
        drive_nucleus_capacity(model, "clean:1-4")
        driven = [model(**inputs, timestep=t).sample for t in ts]
    assert seen[2:] == pytest.approx([parse_capacity("clean:1-4").k(0.9), parse_capacity("clean:1-4").k(0.2)])
    assert not torch.allclose(driven[0], dense[0])  # capacity 1.3 of 4 experts drops work at the noisy step
    undrive_nucleus_capacity(model)
    assert layer.capacity_factor == 4.0
    with torch.no_grad():
        ex = Executor(model, diffroute.resolve_plan("full"), num_inference_steps=2).attach()
        full = [model(**inputs, timestep=t).sample for t in ts]
        ex.detach()
        ex = Executor(model, diffroute.resolve_plan("fora-2"), num_inference_steps=2).attach()
        fora = [model(**inputs, timestep=t).sample for t in ts]
        ex.detach()
    assert all(torch.equal(a, b) for a, b in zip(full, dense, strict=True))
    assert torch.equal(fora[0], dense[0]) and not torch.equal(fora[1], dense[1])  # step 1 reused step 0's features


_RUN = dict(capture_output=True, text=True, timeout=600)
_SMOKE = ["train", "moe", "--model", "emoji", "--iters", "2", "--batch-size", "4", "--train-images", "16", "--json"]


def test_train_moe_cli_resumes_loads_and_refuses_bad_capacity(tmp_path):
    import json

    from diffroute.zoo.registry import load_pipeline, model_family

    args = [*_SMOKE, "--capacity", "clean:1-3", "--out", str(tmp_path / "r")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["variant"] == "moe" and result["capacity"] == "clean:1-3" and "shipped_as" not in result
    weights = (tmp_path / "r" / "model" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = run_cli(*args)  # done: nothing trains again
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "r" / "model" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert model_family(str(tmp_path / "r" / "model")) == "emoji"
    pipe = load_pipeline(str(tmp_path / "r" / "model"))
    layers = moe_layers(pipe.transformer)
    assert len(layers) == 5 and str(layers[0].capacity) == "clean:1-3" and layers[0].dense_mix == 0.0
    bad = run_cli(*_SMOKE, "--capacity", "static:9", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "must lie in (0, 6]" in bad.stderr and not (tmp_path / "bad").exists()


def test_train_moe_on_two_gloo_processes_matches_one(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffroute"]
    args = [*_SMOKE, "--fp32"]
    one = subprocess.run([sys.executable, "-m", "diffroute", *args, "--out", str(tmp_path / "one")], **_RUN)
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], **_RUN)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    weights = "model/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert set(a) == set(b) and any("experts_up" in k for k in a)
    for key in a:  # each process trains on half of the global batch; DDP averages the gradients
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_shipped_variants_load_by_name_and_generate():
    import diffroute
    from diffroute.surgery.moe.capacity import Capacity
    from diffroute.zoo.registry import MODELS, load_pipeline, model_family

    assert {"emoji-moe", "emoji-elastic"} <= set(MODELS)
    assert model_family("emoji-moe") == "emoji" == model_family("emoji-elastic")
    pipe = load_pipeline("emoji-moe")
    layers = moe_layers(pipe.transformer)
    assert len(layers) == 5 and layers[0].capacity == Capacity("clean", (1.0, 3.0))  # the shipped run (make moe)
    assert all(layer.dense_mix == 0.0 for layer in layers)  # the target capacity, not the training warm-up
    images = pipe(["grinning face"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    plan = diffroute.resolve_plan("emoji-elastic:elastic")  # the router shipped with its fine-tuned backbone
    assert plan.router.config.num_steps == 20
    from diffroute.zoo.shipped import plans_for

    # the app offers a model its own shipped plans only: that router belongs to emoji-elastic's weights
    assert "emoji-elastic:elastic" in plans_for("emoji-elastic") and "emoji-elastic:elastic" not in plans_for("emoji")
    assert "emoji:l2c" in plans_for("emoji") and "fora-2" in plans_for("emoji-moe")
