"""Decentralized experts (issue 27) on tiny PixArt experts: the ensemble's selections against each expert alone,
batch independence, save/load, caching plans per expert, bad input refused, the partition, and experts trained
in two processes at once against one after the other."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fresh_pipe, run

import diffroute
from diffroute.errors import InputError
from diffroute.experts.ensemble import ExpertEnsemble, load_ensemble
from diffroute.experts.partition import Partition, check_cluster, kmeans, nearest
from diffroute.experts.router import ExpertRouter
from diffroute.zoo.tiny import pixart_transformer

NAME = "pixart-alpha"
PROMPTS = ["a red apple", "a smiling cat", "a blue car", "a green tree"]


def _experts(k: int):
    """`k` tiny PixArt transformers that differ (the base model's weights, each nudged by its own noise)."""
    base = fresh_pipe(NAME).transformer
    experts = []
    for i in range(k):
        expert = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        experts.append(expert)
    return experts


def _router(k: int, bias: int | None = None) -> ExpertRouter:
    """A random router whose logits are centred (so that it splits the samples), or one that always picks `bias`."""
    torch.manual_seed(0)
    router = ExpertRouter(
        num_experts=k, in_channels=4, sample_size=8, caption_channels=32, width=16, layers=1, heads=2, patch=2
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        router.head.bias.zero_()
        probe = router(torch.randn(64, 4, 8, 8, generator=gen), torch.linspace(0, 999, 64), torch.randn(64, 5, 32))
        router.head.bias.sub_(probe.mean(0))
        if bias is not None:
            router.head.weight.zero_()
            router.head.bias.fill_(-30.0)
            router.head.bias[bias] = 30.0
    return router


def _pipe_with(transformer):
    pipe = fresh_pipe(NAME)
    pipe.register_modules(transformer=transformer)
    return pipe


def _images(pipe, n=2, steps=6):
    return run(pipe, NAME, PROMPTS[:n], list(range(n)), steps=steps)


@pytest.fixture(scope="module")
def experts():
    return _experts(3)


@pytest.fixture(scope="module")
def alone(experts):
    """Each expert's images on its own pipeline (the reference every selection is held to)."""
    return [_images(_pipe_with(e)) for e in experts]


def test_expert_selection_and_a_one_sided_router_give_that_expert_alone_bitwise(experts, alone):
    ensemble = ExpertEnsemble.from_experts(experts, _router(3), selection="expert:1")
    pipe = _pipe_with(ensemble)
    assert np.array_equal(_images(pipe), alone[1])
    assert not np.array_equal(alone[0], alone[1])  # the experts differ: the check above could fail
    ensemble.router.load_state_dict(_router(3, bias=2).state_dict())
    ensemble.set_selection("top1")
    assert np.array_equal(_images(pipe), alone[2])
    assert ensemble.last_routing.experts == [[2] * 4] * 6  # 2 samples x (conditional, unconditional), 6 steps
    ensemble.set_selection("full")  # the other experts run at weight ~e-26: the same image to float precision
    np.testing.assert_allclose(_images(pipe), alone[2], atol=1e-5)


def test_topk_runs_k_experts_per_row_with_renormalised_weights(experts):
    ensemble = ExpertEnsemble.from_experts(experts, _router(3), selection="topk", top_k=2)
    _images(_pipe_with(ensemble))
    for w in ensemble.last_routing.weights:
        assert ((w > 0).sum(-1) == 2).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
        torch.testing.assert_close(w[:2], w[2:])  # a sample's CFG rows share their experts and weights


def test_a_samples_routed_image_does_not_depend_on_its_batch_mates(experts):
    ensemble = ExpertEnsemble.from_experts(experts[:2], _router(2))
    pipe = _pipe_with(ensemble)
    four = _images(pipe, n=4)
    routing = torch.tensor(ensemble.last_routing.experts)  # [steps, 8 rows]
    assert len(set(routing.flatten().tolist())) == 2  # both experts serve: a mixed batch
    torch.testing.assert_close(routing[:, :4], routing[:, 4:])  # unconditional rows follow their samples
    one = run(pipe, NAME, PROMPTS[1:2], [1])
    assert ensemble.last_routing.experts == routing[:, [1, 5]].tolist()
    np.testing.assert_allclose(one[0], four[1], atol=1e-5)  # sub-batch sizes differ: float rounding only


def test_the_ensemble_round_trips_through_save_pretrained_and_load_pipeline_bitwise(experts, tmp_path):
    from diffroute.pipelines import RoutedPixArtAlphaPipeline
    from diffroute.zoo.registry import load_pipeline

    ensemble = ExpertEnsemble.from_experts(experts, _router(3), selection="topk", top_k=2)
    pipe = _pipe_with(ensemble)
    before = _images(pipe)
    pipe.save_pretrained(tmp_path / "ens")
    loaded = load_pipeline(str(tmp_path / "ens"))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, RoutedPixArtAlphaPipeline) and isinstance(loaded.transformer, ExpertEnsemble)
    assert loaded.transformer.selection == "topk" and loaded.transformer.top_k == 2
    assert np.array_equal(_images(loaded), before)


def test_caching_plans_apply_per_expert(experts):
    ensemble = ExpertEnsemble.from_experts(experts[:2], _router(2), selection="expert:0")
    pipe = _pipe_with(ensemble)
    plain = _images(pipe)
    diffroute.apply(pipe, "full")
    assert np.array_equal(_images(pipe), plain)  # a plan that computes everything changes nothing
    diffroute.apply(pipe, "fora-2")
    projected = []

    def count(*_):  # the text projection's real runs: a memoised one runs no Linear
        projected.append(1)

    hooks = [e.caption_projection.linear_1.register_forward_hook(count) for e in ensemble.experts]
    cached = _images(pipe)
    # one expert serves every row: its text projection runs once per call, as on its own pipeline, and the merged
    # stats count what ran
    stats = diffroute.last_stats(pipe)
    assert len(projected) == 1 and stats.invariant_share * stats.transformer_calls == pytest.approx(1)
    single = _pipe_with(experts[0])
    diffroute.apply(single, "fora-2")
    assert np.array_equal(cached, _images(single))  # expert 0's cache behaves as on its own pipeline
    assert not np.array_equal(cached, plain)

    ensemble.set_selection("top1")  # mixed routing: each expert caches for the samples it served
    projected.clear()
    _images(pipe, n=4)
    stats = diffroute.last_stats(pipe)
    assert stats.invariant_share * stats.transformer_calls == pytest.approx(len(projected))
    assert stats.computed_fraction < 1
    assert stats.plan_info["parts"] == 2
    assert stats.plan_info["experts"] == ensemble.last_routing.experts
    served = stats.plan_info["served"]
    assert len(served) == 6 and all(sum(step.values()) == 8 for step in served)  # every row, once per step
    diffroute.remove(pipe)
    ensemble.set_selection("expert:0")
    assert np.array_equal(_images(pipe), plain)
    for hook in hooks:  # the experts are shared with the module's other tests
        hook.remove()


def test_bad_selection_expert_count_and_folders_are_refused(experts, tmp_path):
    with pytest.raises(InputError, match="2 to 64 experts"):
        ExpertEnsemble(expert_config=dict(experts[0].config), num_experts=1)
    ensemble = ExpertEnsemble.from_experts(experts, _router(3))
    for selection, top_k, needle in [
        ("expert:3", None, r"index must be 0\.\.2"),
        ("expert:x", None, "index"),
        ("best", None, "unknown selection"),
        ("topk", 4, "top_k must be from 1 to 3"),
    ]:
        with pytest.raises(InputError, match=needle):
            ensemble.set_selection(selection, top_k)
    assert ensemble.selection == "top1"  # a refused change changes nothing
    with pytest.raises(InputError, match="same class and configuration"):
        ExpertEnsemble.from_experts(
            [experts[0], pixart_transformer(3, 32, 16, caption_channels=32, out_channels=8)], _router(2)
        )

    ensemble.save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "num_experts": 4}))
    with pytest.raises(InputError):  # the config promises an expert the weights do not hold
        load_ensemble(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="config.json"):
        load_ensemble(tmp_path / "t")


def _partition(k=3, n=40, seed=0) -> Partition:
    feats = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    centroids = kmeans(feats, k, seed)
    return Partition(k, np.arange(n) * 2, nearest(feats, centroids), centroids)


def test_partition_round_trips_and_refuses_tampering(tmp_path):
    p = _partition()
    assert sum(p.sizes()) == 40 and all(s > 0 for s in p.sizes())
    path = p.save(tmp_path / "partition.json")
    q = Partition.load(tmp_path)
    assert q.fingerprint() == p.fingerprint() and np.array_equal(q.members(1), p.members(1))
    assert np.array_equal(q.assign(q.centroids), np.arange(3))
    with pytest.raises(InputError, match="cluster"):
        check_cluster(3, 3)
    with pytest.raises(InputError, match="cluster"):
        q.members(-1)
    raw = json.loads(path.read_text())
    for broken in [
        {**raw, "labels": [0] * 39},  # one label short
        {**raw, "labels": [5] + raw["labels"][1:]},  # a cluster that does not exist
        {**raw, "fingerprint": "0" * 16},  # rows or labels changed behind the fingerprint's back
        {k: v for k, v in raw.items() if k != "centroids"},
    ]:
        path.write_text(json.dumps(broken))
        with pytest.raises(InputError):
            Partition.load(path)
    path.write_text("[1, 2")
    with pytest.raises(InputError):
        Partition.load(path)


def test_weighted_kmeans_follows_the_weights():
    x = np.array([[0.0], [1.0], [10.0]], dtype=np.float32)
    one = kmeans(x, 1, 0, weights=np.array([1.0, 1.0, 1.0]))
    heavy = kmeans(x, 1, 0, weights=np.array([1.0, 1.0, 98.0]))
    assert one[0, 0] == pytest.approx(11 / 3, rel=1e-5) and heavy[0, 0] == pytest.approx(9.81, rel=1e-5)


def _expert_args(cluster: int, partition: Path, out: Path) -> list[str]:
    args = ["train", "expert", "--model", "emoji", "--iters", "2", "--batch-size", "4", "--threads", "1"]
    return args + ["--partition", str(partition), "--cluster", str(cluster), "--out", str(out)]


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _train(*runs: list[str]) -> subprocess.Popen:
    """One process training `runs` one after the other."""
    calls = "; ".join(f"main({run!r})" for run in runs)
    return _python(f"from diffroute.cli.main import main; {calls}")


def test_two_experts_trained_at_once_equal_two_trained_one_after_the_other(tmp_path):
    """The experts share nothing: two processes at once give the weights of the same runs in sequence."""
    from safetensors.torch import load_file

    from diffroute.data import emoji as emoji_data

    held = emoji_data.load()["held_out"]
    rows = np.flatnonzero(~held)[:48]
    labels = np.arange(48) % 2
    Partition(2, rows, labels, np.zeros((2, 4), np.float32)).save(tmp_path / "partition.json")

    def weights(folder):
        return load_file(next((folder / "model" / "transformer").glob("*.safetensors")))

    at_once = [_train(_expert_args(i, tmp_path, tmp_path / f"parallel-{i}")) for i in range(2)]
    in_turn = [_expert_args(i, tmp_path, tmp_path / f"serial-{i}") for i in range(2)]
    for proc in at_once:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    proc = _train(*in_turn)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    for i in range(2):
        a, b = weights(tmp_path / f"parallel-{i}"), weights(tmp_path / f"serial-{i}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        info = json.loads((tmp_path / f"serial-{i}" / "model" / "expert.json").read_text())
        assert info["cluster"] == i and info["images"] == 24
    w0, w1 = weights(tmp_path / "serial-0"), weights(tmp_path / "serial-1")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # different clusters: different experts
