"""Training an Elastic-DiT-style router (optionally with the backbone) on the pipeline's own trajectories.

Loss per item (one recorded batch at one step): `MSE(routed prediction, full prediction)`, the full model's own
output on that input recorded before training (self-distillation: works for any supported model without its
training data; the reference trains on data with its flow-matching target instead), plus the budget terms
`(mean over blocks of keep probability - r(t))^2` with r(t) linear from `r_clean` at t = 0 to `r_noisy` at the
noisiest timestep (more blocks near the clean end), and `(mean width over open blocks - width_target)^2`, as the
reference computes them: soft keep probabilities in the block budget; in the width budget the soft expected widths
(softmax over the width logits times the widths) averaged over the blocks the hard mask opens. Both budgets are
per sample (each row must meet r(t) and the width target by itself), which is what limits how far two samples'
compute can differ: only as far as the MSE term gains from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffroute.core.executor import Executor
from diffroute.routers.backbone import backbone_probe
from diffroute.routers.elastic import ElasticPlan, ElasticRouter
from diffroute.training.configs import ElasticConfig
from diffroute.training.routers import check_batch_split, train_router
from diffroute.training.trajectories import output_of, record_calls
from diffroute.utils.checked_load import require_finite
from diffroute.utils.io import atomic_write_json, readable_by_others


class _Trainable(torch.nn.Module):
    """The router, and the transformer when it is fine-tuned, as one module for the trainer (and DDP)."""

    def __init__(self, router: ElasticRouter, transformer, cfg: ElasticConfig):
        super().__init__()
        self.router, self.cfg = router, cfg
        if cfg.finetune:
            self.transformer = transformer
        else:
            self._frozen = [transformer]  # not a submodule: no parameters of it train

    def model(self):
        return self.transformer if self.cfg.finetune else self._frozen[0]

    def param_groups(self, lr: float) -> list[dict]:
        groups = [{"params": list(self.router.parameters()), "lr": lr}]
        if self.cfg.finetune:
            groups.append({"params": list(self.transformer.parameters()), "lr": self.cfg.backbone_lr})
        return groups

    def forward(self, *args, **kwargs):
        return self.model()(*args, **kwargs)


class ElasticLoss:
    """loss_fn for the shared trainer: items are (recorded batch, step, branch) triples."""

    def __init__(self, transformer, recordings, router: ElasticRouter, cfg: ElasticConfig):
        self.recordings, self.cfg = recordings, cfg
        self.plan = ElasticPlan(router, training=True)
        self.executor = Executor(transformer, self.plan, num_inference_steps=router.config.num_steps).attach()
        self.items = [
            (i, k, br)
            for i, steps in enumerate(recordings)
            for k, calls in enumerate(steps)
            for br in range(len(calls))
        ]
        self.t_max = max(float(torch.as_tensor(c[1]["timestep"]).max()) for s in recordings for c in s[0])

    def __call__(self, model, idx: torch.Tensor, gen) -> torch.Tensor:
        losses = [self._item(model, *self.items[int(j)]) for j in idx]
        return torch.stack(losses).mean()

    def _item(self, model, i: int, k: int, branch: int) -> torch.Tensor:
        args, kwargs, target = self.recordings[i][k][branch]
        self.executor.end_call()
        self.plan.aux.clear()
        with self.executor.at_step(k, branch):
            pred = output_of(model(*args, **kwargs)).float()
        mse = torch.nn.functional.mse_loss(pred, target.float())
        keep = torch.stack([a["keep"] for a in self.plan.aux], dim=1)  # [samples, blocks]
        t = torch.as_tensor(kwargs["timestep"], device=keep.device).float().reshape(-1).expand(keep.shape[0])
        r = self.cfg.r_clean + (self.cfg.r_noisy - self.cfg.r_clean) * t / self.t_max
        return mse + budget_loss(self.plan.aux, r, self.cfg.width_target)

    def close(self) -> None:
        self.executor.detach()


def budget_loss(aux: list[dict], r: torch.Tensor, width_target: float) -> torch.Tensor:
    """Elastic-DiT's budget terms for one call, per sample then averaged: `(mean over blocks of the keep probability
    - r(t))^2 + (mean soft expected width over the blocks the hard mask opens - width_target)^2`."""
    keep = torch.stack([a["keep"] for a in aux], dim=1)  # [samples, blocks], soft
    opened = torch.stack([a["open"] for a in aux], dim=1)  # hard 0/1 (straight-through)
    width = torch.stack([a["width"] for a in aux], dim=1)  # soft expected widths
    blocks = ((keep.mean(dim=1) - r) ** 2).mean()
    mean_width = (width * opened).sum(dim=1) / opened.sum(dim=1).clamp_min(1e-6)
    return blocks + ((mean_width - width_target) ** 2).mean()


def train_elastic(pipe, prompts: list[str], call_kwargs: dict, cfg: ElasticConfig, out: Path, accelerator) -> dict:
    """Record trajectories with their predictions, train (resumable from `out`), save `out/router` (and, with
    `finetune`, the whole pipeline as `out/model`, a diffusers folder); returns a summary."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    transformer = pipe.transformer
    num_steps = call_kwargs["num_inference_steps"]
    check_batch_split(cfg.batch, accelerator)
    recordings = record_calls(pipe, prompts, cfg.seed, call_kwargs, cfg.prompts_per_batch, outputs=True)
    torch.manual_seed(cfg.seed)
    router = ElasticRouter.for_model(transformer, num_steps, pipe.scheduler).to(transformer.device)
    model = _Trainable(router, transformer, cfg)
    loss = ElasticLoss(transformer, recordings, router, cfg)
    train_router(
        "elastic",
        model,
        loss,
        cfg,
        transformer,
        out,
        accelerator,
        backbone_trains=cfg.finetune,
        param_groups=model.param_groups,
    )
    summary = {"method": "elastic", **asdict(cfg), "num_steps": num_steps, "seconds": time.time() - t0}
    summary["processes"] = accelerator.num_processes
    if accelerator.is_main_process:
        router = accelerator.unwrap_model(model).router
        require_finite(router.state_dict(), "the Elastic router")
        if cfg.finetune:
            require_finite(transformer.state_dict(), "the fine-tuned transformer")
        probe, dtype = backbone_probe(transformer)  # after training: a fine-tuned backbone is the one it belongs to
        router.register_to_config(backbone_probe=probe, backbone_dtype=dtype)
        router.save_pretrained(out / "router")
        readable_by_others(out / "router")  # diffusers writes its weights private (0600)
        if cfg.finetune:
            pipe.save_pretrained(out / "model")
            readable_by_others(out / "model")
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
