"""The shared trainer's named parts."""

import torch

from diffroute.training.trainer import update_ema


def test_update_ema_moves_float_weights_and_copies_the_rest():
    model = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    model.num_batches_tracked.fill_(7)
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    update_ema(ema, model, 0.75)
    assert torch.equal(ema["weight"], torch.full((2,), 0.25)) and int(ema["num_batches_tracked"]) == 7
