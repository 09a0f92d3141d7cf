"""Plan names and the architecture map of each supported transformer."""

import pytest
import torch

import diffroute
from diffroute.core.arch import ARCHITECTURES

EXPECTED_COMPONENTS = {
    "pixart-alpha": {"attn1", "attn2", "ff"},
    "dit": {"attn1", "ff"},
    "sd3": {"attn", "attn2", "ff", "ff_context"},
    "flux": {"attn", "ff", "ff_context", "proj_mlp", "proj_out"},
    "sana": {"attn1", "attn2", "ff"},
}


@pytest.mark.parametrize("name", list(EXPECTED_COMPONENTS))
def test_architecture_maps(tiny_pipes, name):
    arch = diffroute.architecture_map(tiny_pipes(name).transformer)
    present = {c for row in arch.modules for c, m in zip(arch.components, row) if m is not None}
    assert present == EXPECTED_COMPONENTS[name]


def test_sd3_and_flux_block_structure(tiny_pipes):
    sd3 = diffroute.architecture_map(tiny_pipes("sd3").transformer)
    p = dict(zip(sd3.components, sd3.present().T))
    assert p["attn2"].tolist() == [True, False]  # dual attention in layer 0 only
    assert p["ff_context"].tolist() == [True, False]  # the last block is context-pre-only
    flux = diffroute.architecture_map(tiny_pipes("flux").transformer)
    assert flux.block_names == ["transformer_blocks.0", "single_transformer_blocks.0"]
    p = dict(zip(flux.components, flux.present().T))
    assert p["ff"].tolist() == [True, False] and p["proj_mlp"].tolist() == [False, True]


def test_unsupported_model_names_supported_and_how_to_register():
    with pytest.raises(diffroute.UnsupportedModelError) as e:
        diffroute.architecture_map(torch.nn.Linear(2, 2))
    for cls in ARCHITECTURES:
        assert cls in str(e.value)
    assert "register_architecture" in str(e.value)


def test_register_architecture_for_a_new_model():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x + self.mix(x)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, timestep=None):
            for b in self.layers:
                x = b(x)
            return x

    with pytest.raises(diffroute.UnsupportedModelError):
        diffroute.architecture_map(Toy())
    diffroute.register_architecture(Toy, diffroute.ArchSpec(("layers",), ("mix",)))
    try:
        toy = Toy()
        x = torch.randn(2, 3, 4)
        ref = [toy(x * (1 + 0.1 * t), timestep=torch.tensor([9 - t])) for t in range(4)]
        diffroute.apply(toy, "fora-2", num_inference_steps=4)
        got = [toy(x * (1 + 0.1 * t), timestep=torch.tensor([9 - t])) for t in range(4)]
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])  # computed steps are exact
        assert not torch.equal(got[1], ref[1])  # step 1 reused step 0's outputs
        assert diffroute.last_stats(toy).computed_fraction == 0.5
        with pytest.raises(diffroute.UnsupportedModelError, match="does not match"):
            diffroute.register_architecture(Toy, diffroute.ArchSpec(("layers",), ("attn1",)))
            diffroute.architecture_map(toy)
    finally:
        ARCHITECTURES.pop("Toy", None)


def test_plan_names():
    assert diffroute.resolve_plan("full").name == "full"
    assert diffroute.resolve_plan("fora-4").name == "fora-4"
    with pytest.raises(ValueError, match="Unknown plan 'fora3'.*fora-N"):
        diffroute.resolve_plan("fora3")
    with pytest.raises(ValueError, match="N from 1 to 1000"):
        diffroute.resolve_plan("fora-0")


def test_bare_transformer_needs_step_count(tiny_pipes):
    with pytest.raises(ValueError, match="num_inference_steps"):
        diffroute.apply(tiny_pipes("pixart-alpha").transformer, "fora-2")
