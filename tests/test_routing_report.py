"""The routing reports: the Elastic per-sample compute histogram and the MoE FLOP share and load plot."""

import json

import numpy as np
import torch
from conftest import CALL_KWARGS, fresh_pipe

from diffroute.eval.routing_report import elastic_histogram, moe_flop_share, moe_load_plot
from diffroute.routers.elastic import ElasticPlan, ElasticRouter
from diffroute.surgery.moe import moe_layers, parse_capacity, upcycle_moe
from diffroute.surgery.moe.capacity import tokens_per_expert

STEPS = 4
PROMPTS = ["a red apple", "a smiling cat", "a blue car", "a tree"]


def test_elastic_histogram_reports_each_images_compute(tmp_path):
    pipe = fresh_pipe()
    torch.manual_seed(0)
    router = ElasticRouter.for_model(pipe.transformer, STEPS, pipe.scheduler)
    with torch.no_grad():  # strong input-dependent gates
        for gate in router.gates:
            gate.skip.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
            gate.width.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(2))
    logits = {b: [] for b in range(len(router.gates))}
    hooks = [g.register_forward_hook(lambda m, a, o, b=b: logits[b].append(o[0])) for b, g in enumerate(router.gates)]
    kwargs = CALL_KWARGS["pixart-alpha"]
    elastic_histogram(pipe, ElasticPlan(router), PROMPTS, tmp_path / "probe", batch=2, steps=STEPS, call_kwargs=kwargs)
    for h in hooks:
        h.remove()
    with torch.no_grad():  # centred on each gate's median logit: images differ in what they run
        for b, gate in enumerate(router.gates):
            gate.skip.bias -= torch.cat(logits[b]).median()
    result = elastic_histogram(pipe, ElasticPlan(router), PROMPTS, tmp_path, batch=2, steps=STEPS, call_kwargs=kwargs)
    assert (tmp_path / "histogram.png").stat().st_size > 0
    assert json.loads((tmp_path / "histogram.json").read_text())["n"] == len(PROMPTS)
    blocks, widths, share = (np.array(result[k]) for k in ("block_fraction", "mean_width", "computed_share"))
    assert blocks.shape == (len(PROMPTS),) and ((blocks >= 0) & (blocks <= 1)).all()
    np.testing.assert_allclose(share, blocks * (2 + widths) / 3)  # attn1, attn2 and the FFN at its width
    assert len(set(np.round(share, 6))) > 1  # the images really differ in compute
    assert pipe.last_stats is None or "per_sample_block_fraction" not in (pipe.last_stats.plan_info or {})


def test_moe_flop_share_and_load_plot(tmp_path):
    static, clean = fresh_pipe(), fresh_pipe()
    upcycle_moe(static.transformer, 6, 2, capacity="static:2")  # block 1 of 2; block 0 stays dense
    upcycle_moe(clean.transformer, 6, 2, capacity="clean:1-5")
    kwargs = CALL_KWARGS["pixart-alpha"]
    seen = []
    layer = moe_layers(static.transformer)[0]
    layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    share = moe_flop_share(static, steps=STEPS, call_kwargs=kwargs)
    seq = seen[0]  # tokens per sample the FFN saw
    C = tokens_per_expert(2, seq, 6)
    expected = (2 + 6 * C / seq) / 8  # shared 2 slices + 6 experts taking C of S tokens, of 8 dense slices
    assert share == pytest_approx((expected + 1) / 2)  # with block 0's dense FFN
    assert 0 < moe_flop_share(clean, steps=STEPS, call_kwargs=kwargs) < 1
    data = moe_load_plot(
        {"static:2": static, "clean:1-5": clean},
        PROMPTS[:2],
        tmp_path,
        steps=STEPS,
        call_kwargs=CALL_KWARGS["pixart-alpha"],
    )
    assert (tmp_path / "load.png").stat().st_size > 0
    (s,), (c,) = data["static:2"], data["clean:1-5"]
    assert len(s["load"]) == STEPS and len(set(s["load"])) == 1  # static capacity: the same at every step
    assert c["load"] == sorted(c["load"]) and c["load"][-1] > c["load"][0]  # grows towards the clean end
    assert c["load"][-1] == tokens_per_expert(parse_capacity("clean:1-5").k(c["t_frac"][-1]), seq, 6) / seq
    assert all(0 <= d <= 1 for d in s["dropped"] + c["dropped"])
    assert not moe_layers(static.transformer)[0].record  # recording is switched off again


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-9)
