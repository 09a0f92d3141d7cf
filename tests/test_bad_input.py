"""Bad input gets our own clear error before any work: schedule files, plan names, step counts, non-finite images.

Includes a fuzz test (hypothesis) of the schedule loader and the plan parser: every input either gives a valid
plan/schedule or raises diffroute's InputError with a message, never another exception type.
"""

import json
import os
import stat

import numpy as np
import pytest
import torch
from conftest import CALL_KWARGS, NAMES, prompts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffroute
from diffroute.core.schedule import MAX_FILE_BYTES, Schedule, ScheduleMismatchError
from diffroute.errors import InputError, PlanError
from diffroute.utils.imageio import NonFiniteImagesError, to_uint8
from diffroute.utils.io import atomic_write_json


@pytest.fixture(scope="module")
def arch(tiny_pipes):
    return diffroute.architecture_map(tiny_pipes("pixart-alpha").transformer)


@pytest.fixture()
def valid(arch) -> dict:
    return Schedule.fora(arch, 6, 2).to_dict()


# ---- schedule files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["compute"].__setitem__(1, d["compute"][1].replace("0", "x", 1)), "characters of 0/1"),
        (lambda d: d["compute"].__setitem__(1, d["compute"][1].replace("0", "2", 1)), "characters of 0/1"),
        (lambda d: d.__setitem__("num_steps", float("nan")), "'num_steps' must be an integer"),
        (lambda d: d.__setitem__("num_steps", "6"), "'num_steps' must be an integer"),
        (lambda d: d.__setitem__("num_steps", -6), "'num_steps' must be an integer"),
        (lambda d: d.__setitem__("num_steps", True), "'num_steps' must be an integer"),
        (lambda d: d.__setitem__("provenance", None), "'provenance' must be an object"),
        (lambda d: d.__setitem__("components", "attn1"), "'components' must be a list"),
        (lambda d: d.__setitem__("compute", d["compute"][:-1]), "list of num_steps=6 rows"),
        (lambda d: d["compute"].__setitem__(2, 7), "compute row 2"),
        (lambda d: d.__setitem__("model_class", None), "'model_class'"),
    ],
)
def test_malformed_schedule_fields_are_named(valid, tmp_path, change, message):
    change(valid)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(valid))
    with pytest.raises(ScheduleMismatchError, match=message):
        Schedule.load(path)


@pytest.mark.parametrize("doc", ["[]", '"a string"', "null", "3", '{"format": "diffroute.schedule/v1"}'])
def test_schedule_file_that_is_not_an_object(tmp_path, doc):
    path = tmp_path / "s.json"
    path.write_text(doc)
    with pytest.raises(ScheduleMismatchError):
        Schedule.load(path)


def test_oversized_schedule_refused_before_parsing(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no time or memory spent writing it
    with pytest.raises(InputError, match="the limit is"):
        Schedule.load(path)


def test_plan_names_out_of_range_and_teacache_file(tmp_path, arch, tiny_pipes):
    for name in ("fora-99999999999999999999", "fora-0", "taylor-1001", "dbcache-F99999B1-0.1"):
        with pytest.raises(PlanError):
            diffroute.resolve_plan(name)
    with pytest.raises(PlanError, match="does not exist"):
        diffroute.resolve_plan(str(tmp_path / "missing.json"))
    calib = tmp_path / "calib.json"  # the documented teacache-T@FILE form reaches the policy, not the schedule loader
    calib.write_text(json.dumps({"model_class": arch.model_class, "coefficients": [0.0, 1.0]}))
    plan = diffroute.resolve_plan(f"teacache-0.3@{calib}")
    plan.check(arch)
    assert plan.content(arch)["calibration"] is not None
    calib.write_text(json.dumps({"model_class": arch.model_class, "coefficients": ["x"]}))
    with pytest.raises(InputError, match="coefficients"):
        diffroute.resolve_plan(f"teacache-0.3@{calib}").check(arch)
    with pytest.raises(PlanError, match="Unknown plan"):  # untrusted callers: no file is opened
        diffroute.resolve_plan(f"teacache-0.3@{calib}", allow_files=False)
    with pytest.raises(PlanError, match="Unknown plan"):
        diffroute.resolve_plan(str(calib), allow_files=False)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
_KEYS = ["format", "model_class", "num_steps", "num_blocks", "components", "provenance", "compute"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_schedule_loader(valid, data):
    """Random JSON documents, and valid schedules with one field replaced by random JSON or with a mutated row."""
    kind = data.draw(st.sampled_from(["random", "field", "row"]))
    doc = json.loads(json.dumps(valid))
    if kind == "random":
        doc = data.draw(_json)
    elif kind == "field":
        doc[data.draw(st.sampled_from(_KEYS))] = data.draw(_json)
    else:
        i = data.draw(st.integers(0, len(doc["compute"]) - 1))
        doc["compute"][i] = data.draw(st.text(alphabet="01 x\t", max_size=40))
    try:
        s = Schedule.from_dict(doc)
    except InputError as e:
        assert str(e)
        return
    assert isinstance(s, Schedule) and s.compute.dtype == torch.bool and bool(s.compute[0].all())


@settings(max_examples=300, deadline=None)
@given(
    name=st.one_of(
        st.text(max_size=40),
        st.from_regex(r"(fora|taylor|teacache|fbcache|dbcache-F\d{1,25}B\d{1,25})-[0-9.]{0,25}", fullmatch=True),
        st.from_regex(r"[a-z]{1,6}:[a-z_-]{0,10}", fullmatch=True),
    )
)
def test_fuzz_plan_parser(name):
    try:
        plan = diffroute.resolve_plan(name, allow_files=False)
    except InputError as e:
        assert str(e)
        return
    assert isinstance(plan, diffroute.Plan)


# ---- step counts and non-finite images ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_one_step_works_and_bad_step_counts_are_refused(tiny_pipes, name):
    pipe = tiny_pipes(name)
    key = "class_labels" if name == "dit" else "prompt"
    kwargs = dict(CALL_KWARGS[name], output_type="np")
    if "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]]

    def one():
        return {key: prompts(name)[:1], "generator": [torch.Generator().manual_seed(0)]}

    vanilla = pipe(**one(), **kwargs, num_inference_steps=1).images
    for plan in ("full", "fora-2", "taylor-2"):
        pipe.enable_cache(plan)
        try:
            images = pipe(**one(), **kwargs, num_inference_steps=1).images
            assert pipe.last_stats.computed_fraction == 1.0 and pipe.last_stats.num_steps == 1
        finally:
            pipe.disable_cache()
        assert np.array_equal(images, vanilla), plan  # one step: nothing to reuse
    top = pipe.scheduler.config.num_train_timesteps
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        for steps in (0, -1, top + 1, 2.5):
            with pytest.raises(InputError, match="num_inference_steps must be an integer"):
                pipe(**one(), **kwargs, num_inference_steps=steps)
    finally:
        handle.remove()
    assert not calls  # refused before any work


def test_non_finite_images_are_never_scored():
    from diffroute.metrics.fidelity import psnr

    good = np.full((2, 4, 4, 3), 0.5, dtype=np.float32)
    bad = good.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteImagesError, match="1 of 2 generated images"):
        to_uint8(bad)
    with pytest.raises(NonFiniteImagesError):
        psnr(bad, good)
    assert psnr(good, good) == float("inf")  # identical finite images: that is what inf means


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
