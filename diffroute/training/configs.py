"""Every training method's settings, as dataclasses: their defaults are the only ones (the CLI reads them), and
this module imports no torch, so `diffroute --help` stays quick."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class L2CConfig:
    lam: float = 1e-3  # weight of sum(beta) (the paper's 1e-6..5e-6 is for DiT-XL's loss scale: retune per model)
    threshold: float = 0.1  # compute where beta > threshold (the paper's DiT value)
    alternate: bool = True  # route odd steps only, as the paper (see l2c.py)
    iters: int = 400
    batch: int = 1  # recorded batches per iteration (split across processes)
    lr: float = 0.1  # 10x the reference code's 1e-2: an iteration trains one step's logits only
    prompts_per_batch: int = 16
    seed: int = 0
    bf16: bool = False


@dataclass
class GateConfig:
    rho: float = 1.0  # weight of the FLOP share the gated components compute (retune per model: it sets the ratio)
    threshold: float = 0.5  # compute where m >= threshold (LazyDiT's 0.5)
    per_prompt: bool = False  # decide both CFG rows of a sample together
    iters: int = 60  # trajectories rolled out (each covers every step)
    batch: int = 1  # recorded batches per iteration (split across processes)
    lr: float = 1e-4  # LazyDiT's: a logit sums tokens x channels of w * Z, so a step of lr moves it by ~lr * |Z|_1
    prompts_per_batch: int = 8
    seed: int = 0
    bf16: bool = False
    pooling: str = "mean"  # over tokens: "sum" is LazyDiT's; a mean keeps the logit's scale apart from the tokens
    init: str = ""  # a static plan to start from (its schedule in the gates' biases), e.g. emoji:l2c
    cross_attention: bool = False  # gate cross-attention too (LazyDiT does not: it has no adaLN input)
    # "student": the pipeline's own loop advances the student's latents, the target is the full model at each of
    # them (HarmoniCa's step-wise training); "recorded": the full trajectory's inputs and outputs (teacher forcing);
    # "image": MSE of the final latents vs the full model's from the same noise, backpropagated through the loop
    rollout: str = "student"
    iepo_every: int = 0  # refresh HarmoniCa's per-step loss weights (IEPO) every N iterations (0: equal weights)
    weight_lr_scale: float = 1.0  # the gate weights' rate / the biases' (0: weights frozen at zero, a static plan)
    level: str = "component"  # what a gate decides: a component (LazyDiT) or a whole block (reusing its residual)


@dataclass
class ElasticConfig:
    iters: int = 1500
    batch: int = 1  # recorded batches per iteration (split across processes)
    lr: float = 1e-3  # the router's learning rate
    backbone_lr: float = 3e-5  # the transformer's, when fine-tuned
    finetune: bool = False
    r_clean: float = 0.9  # fraction of blocks kept at t = 0
    r_noisy: float = 0.5  # ... at the noisiest timestep
    width_target: float = 0.75
    prompts_per_batch: int = 16
    seed: int = 0
    bf16: bool = False


@dataclass
class DataTrainConfig:
    """What every variant's training shares."""

    iters: int = 1000  # training steps
    batch_size: int = 64
    lr: float = 1e-4
    ema_decay: float = 0.999
    train_images: int = 0  # the first N training images only (0: all; small N for smoke tests)
    seed: int = 0
    bf16: bool = True
    domain: str = "emoji"  # emoji (Noto, the model's own) or symbola (the adaptation target)
    snapshots: int = 0  # also save the (EMA) model this many times, evenly spaced, as out/snapshots/step-N


@dataclass
class MoEConfig(DataTrainConfig):
    variant: str = "moe"
    num_experts: int = 6
    shared: int = 2
    capacity: str = "static:2"
    dense_until: float = 0.2  # fraction of the steps run dense (k = E)
    sparse_from: float = 0.6  # ... by which k has decayed to the schedule
    router_loss: float = 1e-3  # weight of the routers' logit penalty mean(z^2) (holds the gates near the dense 1)
    router_init_std: float = 0.0  # 0: the upcycled model is the dense one when training starts
    pruned_slices: int = 4  # of num_experts + shared slices, dropped by the `pruned` variant


@dataclass
class AdapterConfig(DataTrainConfig):
    method: str = "fera"  # fera | lora
    num_experts: int = 3
    rank: int = 4
    fecl: float = 0.1  # FeRA's consistency loss weight
    balance: float = 0.0  # FeRA's load-balancing weight (not in the paper)
    alpha: float | None = None  # LoRA alpha; None: FeRA 1 (the paper's), LoRA rank / 4 (FeRA's alpha / r)


@dataclass
class StreamConfig(DataTrainConfig):
    method: str = "dar"
    init: str = "shipped"  # shipped | scratch
    mode: str = "retrofit"  # DAR: retrofit | scratch
    query: str = "static+t"  # DAR: static | static+t | dynamic
    beta: float = 0.8  # DTR: share of channels active
    alpha: float = 4.0  # DTR: how the window slides with t


@dataclass
class ExpertConfig(DataTrainConfig):
    """One decentralized expert: the emoji transformer fine-tuned on one cluster of a partition, in isolation."""

    partition: str = ""  # a partition.json (or the folder holding it), from `diffroute train partition`
    cluster: int = 0


@dataclass
class ExpertRouterConfig(DataTrainConfig):
    """The router of an expert ensemble: a classifier of the clean sample's cluster from (x_t, t, caption)."""

    partition: str = ""
    experts: str = ""  # comma-separated expert model folders, in cluster order (the ensemble is assembled from them)
    width: int = 96
    layers: int = 2
    heads: int = 4
    patch: int = 2
    # captions replaced by the empty one for this share of the batch (on top of the data's 10%): with every caption
    # seen, the router learns the training captions' clusters by heart and never reads the latent
    caption_dropout: float = 0.5
    iters: int = 4000
    lr: float = 1e-3
    ema_decay: float = 0.0
    bf16: bool = False
