"""Routed*Pipeline is a drop-in for the diffusers pipeline it extends: same call signature and docstring, and the
vanilla pipeline's behaviours (images per prompt, step-end callbacks, output types, tuple returns, save/load,
prompt embeddings) give the vanilla results under `full` and agree between batched and single calls under a plan."""

import inspect

import numpy as np
import pytest
import torch
from conftest import CALL_KWARGS, NAMES, prompts

import diffroute
from diffroute.pipelines import ROUTED_PIPELINES

STEPS = 4
PROMPT_NAMES = [n for n in NAMES if n != "dit"]  # DiT takes class labels: no prompt embeddings


def _vanilla(routed):
    """The vanilla diffusers pipeline over the same components (no copies)."""
    cls = next(c for c in type(routed).__mro__ if c.__module__.startswith("diffusers.pipelines"))
    pipe = cls(**routed.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(name, **overrides):
    kwargs = dict(CALL_KWARGS[name], num_inference_steps=STEPS)
    kwargs.update(overrides)
    return kwargs


def _prompt(name, n=1):
    return {"class_labels": prompts(name)[:n]} if name == "dit" else {"prompt": prompts(name)[:n]}


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _call(pipe, name, plan=None, **kwargs):
    """One call of `pipe` (routed under `plan`, or as given when plan is None); the plan is removed afterwards."""
    if plan is not None:
        pipe.enable_cache(plan)
    try:
        return pipe(**kwargs)
    finally:
        if plan is not None:
            pipe.disable_cache()


def _arrays(images):
    if isinstance(images, list):  # PIL
        return np.stack([np.asarray(im) for im in images])
    return images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)


@pytest.fixture(autouse=True)
def _clean(tiny_pipes):
    yield
    for name in NAMES:
        diffroute.remove(tiny_pipes(name))


@pytest.mark.parametrize("vanilla_name", sorted(ROUTED_PIPELINES))
def test_call_signature_and_docstring_are_the_vanilla_ones(vanilla_name):
    routed = ROUTED_PIPELINES[vanilla_name]
    vanilla = next(c for c in routed.__mro__ if c.__name__ == vanilla_name)
    assert inspect.signature(routed.__call__) == inspect.signature(vanilla.__call__)
    assert routed.__call__.__doc__ == vanilla.__call__.__doc__
    assert "prompt" in inspect.signature(routed.__call__).parameters or vanilla_name == "DiTPipeline"


@pytest.mark.parametrize("name", NAMES)
def test_num_images_per_prompt(tiny_pipes, name):
    pipe = tiny_pipes(name)
    if "num_images_per_prompt" not in inspect.signature(pipe.__call__).parameters:
        pytest.skip(f"{type(pipe).__name__} has no num_images_per_prompt")
    kw = _kwargs(name, num_images_per_prompt=2, output_type="np")
    vanilla = _call(_vanilla(pipe), name, **_prompt(name), **kw, generator=_gens(3, 4)).images
    routed = _call(pipe, name, "full", **_prompt(name), **kw, generator=_gens(3, 4)).images
    assert vanilla.shape[0] == 2 and np.array_equal(vanilla, routed)
    batched = _call(pipe, name, "fora-2", **_prompt(name), **kw, generator=_gens(3, 4)).images
    kw1 = _kwargs(name, num_images_per_prompt=1, output_type="np")
    singles = [_call(pipe, name, "fora-2", **_prompt(name), **kw1, generator=_gens(s)).images for s in (3, 4)]
    assert not np.allclose(batched, routed, atol=1e-4)  # the plan changed something
    np.testing.assert_allclose(batched, np.concatenate(singles), atol=1e-4)


def _step_callback(pipe, log) -> dict:
    """Call kwargs of a callback that logs (step, latents): `callback_on_step_end`, or PixArt's older `callback`."""
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:

        def on_step_end(p, step, timestep, tensors):
            log.append((step, tensors["latents"].clone()))
            return tensors

        return dict(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    if "callback" in params:
        return dict(callback=lambda step, t, latents: log.append((step, latents.clone())), callback_steps=1)
    pytest.skip(f"{type(pipe).__name__} takes no step callback")


@pytest.mark.parametrize("name", NAMES)
def test_step_callbacks(tiny_pipes, name):
    pipe = tiny_pipes(name)
    runs = {}
    for key, target, plan in (("vanilla", _vanilla(pipe), None), ("full", pipe, "full"), ("fora-2", pipe, "fora-2")):
        log = []
        kw = _kwargs(name, output_type="np")
        _call(target, name, plan, **_prompt(name), **kw, generator=_gens(1), **_step_callback(target, log))
        runs[key] = log
    assert [s for s, _ in runs["vanilla"]] == list(range(STEPS)) == [s for s, _ in runs["fora-2"]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(runs["vanilla"], runs["full"], strict=True))
    assert torch.equal(runs["fora-2"][0][1], runs["full"][0][1])  # step 0 always computes
    assert not torch.equal(runs["fora-2"][-1][1], runs["full"][-1][1])


@pytest.mark.parametrize("name", NAMES)
def test_output_types_and_tuple_return(tiny_pipes, name):
    pipe = tiny_pipes(name)
    types = ["np", "pil"] + ([] if name == "dit" else ["latent"])  # DiTPipeline always decodes
    for output_type in types:
        kw = dict(**_prompt(name), **_kwargs(name, output_type=output_type))
        vanilla = _arrays(_call(_vanilla(pipe), name, **kw, generator=_gens(2)).images)
        routed = _call(pipe, name, "full", **kw, generator=_gens(2))
        assert np.array_equal(vanilla, _arrays(routed.images)), output_type
        as_tuple = _call(pipe, name, "fora-2", **kw, generator=_gens(2), return_dict=False)
        as_dict = _call(pipe, name, "fora-2", **kw, generator=_gens(2))
        assert isinstance(as_tuple, tuple)
        assert np.array_equal(_arrays(as_tuple[0]), _arrays(as_dict.images)), output_type


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(tiny_pipes, name, tmp_path):
    """Saved by the routed class, loaded by both: the routed class under `full` equals the vanilla class (bitwise),
    and under a plan equals the pipeline it was saved from (FLUX's scheduler config moves by ~1e-7 through a
    save/load in vanilla diffusers too, so that comparison has a tolerance)."""
    pipe = tiny_pipes(name)
    pipe.save_pretrained(tmp_path / name)
    absent = {k: None for k, v in pipe.components.items() if v is None}  # as with vanilla diffusers (SD3's T5)
    loaded = type(pipe).from_pretrained(tmp_path / name, **absent)
    vanilla = _vanilla(pipe).__class__.from_pretrained(tmp_path / name, **absent)
    for p in (loaded, vanilla):
        p.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    kw = dict(**_prompt(name), **_kwargs(name, output_type="np"))
    expected = _call(vanilla, name, **kw, generator=_gens(5)).images
    assert np.array_equal(_call(loaded, name, "full", **kw, generator=_gens(5)).images, expected)
    before = _call(pipe, name, "fora-2", **kw, generator=_gens(5)).images
    np.testing.assert_allclose(_call(loaded, name, "fora-2", **kw, generator=_gens(5)).images, before, atol=1e-5)


def _embeddings(pipe, name, prompt):
    """Call kwargs that carry `prompt` as embeddings from the pipeline's own encode_prompt (per family)."""
    if name in ("pixart-alpha", "pixart-sigma", "sana"):
        extra = {"clean_caption": False} if name.startswith("pixart") else {"complex_human_instruction": None}
        pe, pm, ne, nm = pipe.encode_prompt(prompt, do_classifier_free_guidance=True, max_sequence_length=16, **extra)
        return dict(  # PixArt and Sana default negative_prompt to "", which they refuse beside negative embeddings
            prompt_embeds=pe,
            prompt_attention_mask=pm,
            negative_prompt_embeds=ne,
            negative_prompt_attention_mask=nm,
            negative_prompt=None,
        )
    if name == "sd3":
        pe, ne, pp, npp = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True
        )
        return dict(
            prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp
        )
    if name == "flux":
        pe, pp, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=16)
        ne, npp, _ = pipe.encode_prompt(prompt=["blurry"] * len(prompt), prompt_2=None, max_sequence_length=16)
        return dict(
            prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npp
        )
    raise AssertionError(name)


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_prompt_embeddings_instead_of_prompts(tiny_pipes, name):
    pipe = tiny_pipes(name)
    text = prompts(name)[:2]
    kw = _kwargs(name, output_type="np")
    kw.pop("negative_prompt", None)  # carried by the negative embeddings
    with torch.no_grad():
        embeds = _embeddings(pipe, name, text)
    by_prompt = dict(_kwargs(name, output_type="np"))
    if "negative_prompt" in by_prompt:
        by_prompt["negative_prompt"] = [by_prompt["negative_prompt"]] * 2
    vanilla = _call(_vanilla(pipe), name, prompt=text, **by_prompt, generator=_gens(6, 7)).images
    routed = _call(pipe, name, "full", **embeds, **kw, generator=_gens(6, 7)).images
    np.testing.assert_allclose(routed, vanilla, atol=1e-5)
    planned = _call(pipe, name, "fora-2", **embeds, **kw, generator=_gens(6, 7)).images
    planned_prompt = _call(pipe, name, "fora-2", prompt=text, **by_prompt, generator=_gens(6, 7)).images
    np.testing.assert_allclose(planned, planned_prompt, atol=1e-5)
    assert not np.allclose(planned, routed, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_removing_a_plan_leaves_every_module_as_it_was_found(name):
    """After a plan with every kind of hook (step, watched blocks, blocks reused whole, components, the text
    projection memo) is applied, run and removed, no module keeps a `forward` of its own: a model compiled before
    the plan would otherwise see another attribute and recompile."""
    from conftest import fresh_pipe

    pipe = fresh_pipe(name)
    before = {n for n, m in pipe.transformer.named_modules() if "forward" in m.__dict__}
    for plan in ("fbcache-0.2", "fora-2+blocks", "fora-2"):
        pipe.enable_cache(plan)
        pipe(**_prompt(name, 2), **_kwargs(name), generator=_gens(0, 1), output_type="np")
        hooked = {n for n, m in pipe.transformer.named_modules() if "forward" in m.__dict__}
        assert hooked - before  # (the plan's hooks are there while it is on)
        pipe.disable_cache()
        assert {n for n, m in pipe.transformer.named_modules() if "forward" in m.__dict__} == before, plan


def test_flux_one_negative_prompt_for_a_batch_reuses_blocks_whole():
    """FLUX with true CFG and one negative prompt for several prompts: the negative branch's text stream is broadcast
    over the batch by the first block, so a block reused whole adds a per-row text residual to a one-row input; the
    images are those of the negative prompt given once per prompt."""
    from conftest import fresh_pipe

    pipe = fresh_pipe("flux")
    pipe.enable_cache("fora-2+blocks")
    images = {}
    for negative in ("blurry", ["blurry"] * 2):
        kwargs = _kwargs("flux", negative_prompt=negative)
        images[str(negative)] = pipe(**_prompt("flux", 2), **kwargs, generator=_gens(0, 1), output_type="np").images
    np.testing.assert_allclose(*images.values(), atol=1e-5)
