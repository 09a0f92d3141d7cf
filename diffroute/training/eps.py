"""The ε-prediction objective on the emoji data: noised batches of VAE latents with their caption embeddings (10%
caption dropout for classifier-free guidance), shared by the emoji model's recipe and every fine-tune on its data."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffroute.metrics.text import token_embeddings

BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)


def images_of(data, idx) -> torch.Tensor:
    """Images `idx` of the data set as floats in [-1, 1], NCHW."""
    return torch.from_numpy(data["images"][idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1


class EpsBatches:
    """Noised training batches of the emoji data (epsilon prediction, 10% caption dropout): the VAE posterior
    moments of the training images and their caption embeddings, computed once."""

    def __init__(self, data, train_idx, vae, device):
        captions = [str(c) for c in data["captions"][train_idx.numpy()]]
        self.emb, self.mask = token_embeddings(captions)
        self.null_emb, self.null_mask = token_embeddings([""])  # what the pipeline uses for the unconditional branch
        with torch.no_grad():
            moments = []
            for i in range(0, len(train_idx), 256):
                post = vae.encode(images_of(data, train_idx[i : i + 256]).to(device)).latent_dist
                moments.append(torch.cat([post.mean, post.std], 1).cpu())
        self.moments, self.scale, self.device = torch.cat(moments), vae.config.scaling_factor, device
        self.noise_sched = DDPMScheduler(**BETAS)

    def __len__(self) -> int:
        return len(self.moments)

    def __call__(self, idx, gen) -> tuple[dict, torch.Tensor]:
        """(the transformer's keyword arguments, the noise to predict) for the items `idx`."""
        mean, std = self.moments[idx].chunk(2, 1)
        x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scale
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = self.noise_sched.add_noise(x0, eps, t)
        drop = torch.rand(len(idx), generator=gen) < 0.1  # caption dropout for classifier-free guidance
        e = torch.where(drop[:, None, None], self.null_emb, self.emb[idx])
        am = torch.where(drop[:, None], self.null_mask, self.mask[idx])
        dev = self.device
        kwargs = dict(
            hidden_states=xt.to(dev),
            encoder_hidden_states=e.to(dev),
            encoder_attention_mask=am.to(dev),
            timestep=t.to(dev),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
        return kwargs, eps.to(dev)
