"""FeRA (arXiv 2511.17979): LoRA experts on the attention projections, mixed per sample by a router that reads the
noisy latent's energy in frequency bands, so that adaptation follows the denoising stage. Also plain LoRA, the
baseline, through the same install / save / load path.

- **Bands** (`frequency_bands`): Gaussian blurs of z_t at sigma = 0.5, 1, 2 *latent pixels* with reflect padding;
  high = z - G_0.5 z, mids = G_s z - G_2s z, low = G_2 z (they sum to z). The reference's sigma = kappa 2^k with
  kappa = min(H, W) / 128 gives sigma <= 0.25 on 8x8 latents: every blur is a 1x1 kernel and the indicator is
  constant (ROUTING.md §4); its code also drops the high band. Energies: each band's sum of squares, normalised.
- **Router**: `MLP(bands -> 64 -> ReLU -> E)`, `w = softmax(logits / 0.7)`, per sample, shared by every adapted
  layer, recomputed at each transformer call from its input latent by a listener on the shared call-context hook
  (`diffroute.core.call_context`; CFG rows carry the same latent, so they line up) and cleared after the call.
- **Experts**: E rank-r LoRA adapters on `to_q, to_k, to_v, to_out.0`, made and stored by peft
  (`inject_adapter_in_model`; A Kaiming, B zero, so the model is unchanged at initialisation). peft applies one
  adapter or a fixed sum per batch, not a per-sample mixture, so its layers run base-only and a hook here adds
  `sum_e w_e (alpha / r) B_e A_e x` (hand-written for that reason).
- `disable_fera` / `enable_fera` switch the mixture off and on (off is the base model bitwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.hooks import HookRegistry, ModelHook

from diffroute.core.call_context import CallInfo, add_call_listener, hidden_states_of, remove_call_listener
from diffroute.errors import PlanError
from diffroute.utils.unhook import remove_hook

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SIGMAS = (0.5, 1.0, 2.0)
FERA_KEY, LORA_KEY = "diffroute_fera", "diffroute_lora"
CALL_LISTENER, MIX_HOOK = "diffroute_fera", "diffroute_fera_mix"


def gaussian_blur(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with reflect padding (radius ceil(3 sigma), at most H - 1)."""
    radius = min(math.ceil(3 * sigma), z.shape[-1] - 1, z.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, device=z.device, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).to(z.dtype)
    c = z.shape[1]
    z = F.pad(z, (radius, radius, radius, radius), mode="reflect")
    z = F.conv2d(z, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(z, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def frequency_bands(z: torch.Tensor, sigmas=SIGMAS) -> list[torch.Tensor]:
    """[high, mid..., low] of a latent [B, C, H, W]; they sum to z."""
    blurred = [gaussian_blur(z, s) for s in sigmas]
    return [z - blurred[0], *(a - b for a, b in zip(blurred, blurred[1:], strict=False)), blurred[-1]]


def band_energies(z: torch.Tensor, sigmas=SIGMAS) -> torch.Tensor:
    """[B, bands]: each band's share of the energy (sums to 1 per sample)."""
    e = torch.stack([b.float().square().flatten(1).sum(1) for b in frequency_bands(z, sigmas)], dim=1)
    return e / e.sum(1, keepdim=True).clamp_min(1e-12)


def latent_grid(hidden: torch.Tensor) -> torch.Tensor:
    """The transformer's input as an image [B, C, H, W]: as given, or packed tokens [B, S, C] on a square grid
    (FLUX packs 2x2 latent patches into tokens)."""
    if hidden.ndim == 4:
        return hidden
    side = math.isqrt(hidden.shape[1])
    if side * side != hidden.shape[1]:
        raise PlanError(f"FeRA needs a square latent grid; got {hidden.shape[1]} tokens.")
    return hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)


class FeRARouter(ModelMixin, ConfigMixin):
    """Band energies -> per-sample weights over the LoRA experts."""

    @register_to_config
    def __init__(self, num_experts: int = 3, sigmas: tuple = SIGMAS, hidden: int = 64, temperature: float = 0.7):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(len(sigmas) + 1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_experts)
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        energies = band_energies(latent_grid(latent), tuple(self.config.sigmas))
        logits = self.mlp(energies.to(self.mlp[0].weight.dtype))
        return torch.softmax(logits.float() / self.config.temperature, dim=-1)


class _CallListener:
    """On the transformer's call context: the routing weights of this call, from its input latent; cleared after."""

    def __init__(self, router, state):
        self.router, self.state = router, state

    def begin(self, info: CallInfo) -> None:
        self.state.weights = self.state.last = self.router(info.hidden_states)
        if self.state.record:  # the call's timestep per row, for weights-against-t plots
            t = info.timestep if info.raw_timestep is not None else torch.full_like(info.timestep, float("nan"))
            self.state.timesteps.append(t.detach().float().cpu())

    def end(self) -> None:
        if self.state.record:
            self.state.history.append(self.state.weights.detach().cpu())
        self.state.weights = None


class _MixHook(ModelHook):
    """On one peft LoRA layer (running base-only): adds the per-sample mixture of its experts."""

    def __init__(self, state, names: list[str]):
        super().__init__()
        self.state, self.names = state, names

    def pre_forward(self, module, *args, **kwargs):
        self._x = hidden_states_of(args, kwargs, "x")
        return args, kwargs

    def post_forward(self, module, output):
        x, self._x = self._x, None
        w = self.state.weights
        if w is None:
            return output
        w = w.to(output.dtype).reshape(w.shape[0], *([1] * (output.ndim - 2)), w.shape[1])
        for e, name in enumerate(self.names):
            delta = module.lora_B[name](
                module.lora_A[name](module.lora_dropout[name](x.to(module.lora_A[name].weight.dtype)))
            )
            output = output + w[..., e : e + 1] * (module.scaling[name] * delta).to(output.dtype)
        return output


class _State:
    def __init__(self):
        self.weights, self.record = None, False
        self.last = None  # the latest call's weights, kept after it (with their graph) for a training loss on them
        self.history, self.timesteps = [], []  # per recorded call: weights [B, E] and timesteps [B]


def _inject(transformer, names: list[str], rank: int, alpha: float, targets) -> list:
    import warnings

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    # peft freezes the base parameters; leave them as they were (Sana's output moves by 1e-7 with frozen weights,
    # and freezing is the trainer's business)
    flags = {p: p.requires_grad for p in transformer.parameters()}
    with warnings.catch_warnings():  # several adapters in one model is the point here
        warnings.simplefilter("ignore")
        for name in names:
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
            inject_adapter_in_model(config, transformer, adapter_name=name)
    for param, flag in flags.items():
        param.requires_grad_(flag)
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise PlanError(f"no module of {transformer.__class__.__name__} matches {list(targets)}")
    return layers


def apply_fera(
    transformer, num_experts: int = 3, rank: int = 4, alpha: float = 1.0, targets=TARGETS, sigmas=SIGMAS
) -> FeRARouter:
    """Install FeRA on `transformer` (router as its submodule `fera_router`; settings in its config)."""
    if getattr(transformer, "_diffroute_fera", None) is not None or getattr(transformer, "peft_config", None):
        raise PlanError("this transformer has LoRA adapters already; one FeRA or LoRA install at a time.")
    names = [f"fera_{e}" for e in range(num_experts)]
    layers = _inject(transformer, names, rank, alpha, targets)
    for layer in layers:
        layer.enable_adapters(False)  # peft runs the base layer; the mix hook adds the routed experts
    router = FeRARouter(num_experts, tuple(sigmas))
    param = next(transformer.parameters())
    torch.nn.Module.to(router, device=param.device, dtype=param.dtype)
    transformer.fera_router = router
    state = _State()
    transformer._diffroute_fera = {"state": state, "layers": layers, "names": names, "enabled": False}
    enable_fera(transformer)
    transformer.register_to_config(
        **{
            FERA_KEY: {
                "num_experts": num_experts,
                "rank": rank,
                "alpha": alpha,
                "targets": list(targets),
                "sigmas": list(sigmas),
            }
        }
    )
    return router


def enable_fera(transformer) -> None:
    """Switch the routed experts on (as `apply_fera` leaves them)."""
    fera = _fera(transformer)
    if fera["enabled"]:
        return
    add_call_listener(transformer, CALL_LISTENER, _CallListener(transformer.fera_router, fera["state"]))
    for layer in fera["layers"]:
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(
            _MixHook(fera["state"], fera["names"]), MIX_HOOK
        )
    fera["enabled"] = True


def disable_fera(transformer) -> None:
    """Switch the experts off: the base model, bitwise (peft's layers run their base layer only)."""
    fera = _fera(transformer)
    if not fera["enabled"]:
        return
    remove_call_listener(transformer, CALL_LISTENER)
    for layer in fera["layers"]:
        remove_hook(layer, MIX_HOOK)
    fera["enabled"] = False


def _fera(transformer) -> dict:
    fera = getattr(transformer, "_diffroute_fera", None)
    if fera is None:
        raise PlanError("this transformer has no FeRA adapters (apply_fera first).")
    return fera


def apply_lora(transformer, rank: int = 4, alpha: float | None = None, targets=TARGETS) -> list:
    """The baseline: one peft LoRA adapter (`lora`) on the same modules, applied by peft itself. alpha defaults
    to rank / 4 so that alpha / r matches FeRA's default scaling (1 / 4)."""
    if getattr(transformer, "peft_config", None):
        raise PlanError("this transformer has LoRA adapters already; one FeRA or LoRA install at a time.")
    alpha = rank / 4 if alpha is None else alpha
    layers = _inject(transformer, ["lora"], rank, alpha, targets)
    transformer.register_to_config(**{LORA_KEY: {"rank": rank, "alpha": alpha, "targets": list(targets)}})
    return layers


def set_lora_enabled(transformer, enabled: bool) -> None:
    """peft's own switch for the plain LoRA baseline (off: the base model, bitwise)."""
    from peft.tuners.lora import LoraLayer

    for m in transformer.modules():
        if isinstance(m, LoraLayer):
            m.enable_adapters(enabled)


def last_routing_weights(transformer) -> torch.Tensor:
    """The routing weights [B, E] of the transformer's latest call (differentiable when it ran with grad)."""
    last = _fera(transformer)["state"].last
    if last is None:
        raise PlanError("FeRA has routed no call yet.")
    return last


def adapter_parameters(transformer) -> list[torch.nn.Parameter]:
    """What trains: the LoRA A/B matrices and FeRA's router (the base stays frozen)."""
    params = [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if hasattr(transformer, "fera_router"):
        params += list(transformer.fera_router.parameters())
    return params
