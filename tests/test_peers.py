"""Benchmark peers (diffusers' own caches) run on our pipelines with the step context we supply, and leave no trace."""

import numpy as np
import pytest
from conftest import run

from diffroute.eval.peers import activate, check_spec, computed_fraction, deactivate

PEERS = ["diffusers:fbc-0.2", "diffusers:pab-2", "diffusers:faster", "diffusers:taylorseer-3"]


@pytest.fixture(scope="module")
def pipe():
    from diffroute.zoo.tiny import tiny_pixart

    p = tiny_pixart(num_layers=4)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("peer", PEERS)
def test_peer_skips_work_is_repeatable_and_removable(pipe, peer):
    full = run(pipe, "pixart-alpha", ["a cat"], [0], steps=20)
    activate(pipe, peer)
    try:
        a = run(pipe, "pixart-alpha", ["a cat"], [0], steps=20)
        b = run(pipe, "pixart-alpha", ["a cat"], [0], steps=20)  # state is reset between calls
        assert 0 < computed_fraction(pipe) < 1
    finally:
        deactivate(pipe)
    assert np.array_equal(a, b) and not np.array_equal(a, full)
    assert np.array_equal(run(pipe, "pixart-alpha", ["a cat"], [0], steps=20), full)


def test_cachedit_peer(pipe):
    pytest.importorskip("cache_dit", reason="cache-dit is the optional `bench` extra")
    full = run(pipe, "pixart-alpha", ["a cat"], [0], steps=20)
    activate(pipe, "cachedit:dbcache-taylor-F1B1-0.2")
    try:
        out = run(pipe, "pixart-alpha", ["a cat"], [0], steps=20)
        assert 0 < computed_fraction(pipe) < 1
    finally:
        deactivate(pipe)
    assert np.isfinite(out).all()
    assert np.array_equal(run(pipe, "pixart-alpha", ["a cat"], [0], steps=20), full)


def test_unknown_peer_is_refused():
    with pytest.raises(ValueError, match="unknown peer"):
        check_spec("diffusers:warp-9")


def test_computed_fraction_counts_rows_not_calls(pipe, monkeypatch):
    """FasterCache computes only the conditional rows at some steps: those executions count half, as rows."""
    from diffroute.eval import peers

    rows = []  # rows of each executed component call, seen by the innermost counting hook
    count = peers._Count.pre_forward

    def spy(self, module, *args, **kwargs):
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[0])
        return count(self, module, *args, **kwargs)

    monkeypatch.setattr(peers._Count, "pre_forward", spy)
    activate(pipe, "diffusers:faster")
    try:
        run(pipe, "pixart-alpha", ["a cat"], [0], steps=20)  # one prompt with CFG: 2 rows per call
        executed, total = peers.call_counts(pipe)
    finally:
        deactivate(pipe)
    assert 1 in rows and 2 in rows  # some executions ran on the conditional row only
    assert executed == sum(rows) / 2 < len(rows)  # rows counted, not calls


def test_magcache_is_calibrated_on_the_model_then_skips(pipe, tmp_path, capsys):
    """`diffroute calibrate --method magcache` writes diffusers' own ratios beside the model; `diffusers:mag-T` reads
    them, skips whole steps after the retained 20%, and leaves no trace; without a calibration it says what to run."""
    import json

    from conftest import CALL_KWARGS

    from diffroute.cli.main import main
    from diffroute.errors import InputError
    from diffroute.zoo.registry import load_pipeline

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "diffroute.json").write_text(json.dumps({"call_defaults": CALL_KWARGS["pixart-alpha"]}))
    pipe.save_pretrained(tmp_path / "p")
    model = load_pipeline(str(tmp_path / "p"))
    model.set_progress_bar_config(disable=True)
    with pytest.raises(InputError, match="calibrate --method magcache"):
        activate(model, "diffusers:mag-0.5")
    assert not hasattr(model.transformer, "_diffroute_peer")  # the failed apply left no hook behind
    main(["calibrate", "--method", "magcache", "--model", str(tmp_path / "p"), "--steps", "20", "--n", "2",
          "--prompt", "a cat", "--prompt", "a dog", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)  # stdout holds our JSON only, not diffusers' printed copy
    saved = json.loads((tmp_path / "p" / "magcache.json").read_text())
    ratios = saved["mag_ratios"]
    assert ratios == result["mag_ratios"] and saved["model_class"] == "PixArtTransformer2DModel"
    assert len(ratios) == 20 and ratios[0] == 1.0 and all(np.isfinite(ratios)) and len(set(ratios)) > 2

    full = run(model, "pixart-alpha", ["a cat"], [0], steps=20)
    activate(model, "diffusers:mag-0.5")
    try:
        a = run(model, "pixart-alpha", ["a cat"], [0], steps=20)
        b = run(model, "pixart-alpha", ["a cat"], [0], steps=20)
        fraction = computed_fraction(model)
    finally:
        deactivate(model)
    assert 0 < fraction < 1 and np.array_equal(a, b) and not np.array_equal(a, full)
    assert np.array_equal(run(model, "pixart-alpha", ["a cat"], [0], steps=20), full)


def test_a_peer_keeps_the_pipelines_cond_and_uncond_states_apart(monkeypatch):
    """FLUX's true CFG names its two calls per step ("cond", "uncond"); the peer's cache context passes those names
    on (it used to say "cond" for both, so the unconditional call read the conditional call's cache)."""
    from conftest import fresh_pipe
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import StateManager

    names, get_state = [], StateManager.get_state

    def spy(self):
        names.append(self.context.name)
        return get_state(self)

    monkeypatch.setattr(StateManager, "get_state", spy)
    flux = fresh_pipe("flux")
    activate(flux, "diffusers:fbc-0.2")
    try:
        run(flux, "flux", ["a cat"], [0], steps=4)
    finally:
        deactivate(flux)
    assert set(names) == {"cond", "uncond"} and names.count("cond") == names.count("uncond")
    assert HookRegistry.check_if_exists_or_initialize(flux.transformer).hooks == {}
