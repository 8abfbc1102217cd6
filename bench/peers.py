"""diffusers as the peer of the benchmarks: its UNet2DModel sized like our U-Net, and its
schedulers driving our network. diffusers is a benchmark-only install, never a dependency
of the toolkit (``pip install diffusers``).

Time convention. Our VP-SDE's discrete chain (``sde/sdes.py``) has steps i = 1..N at
t_i = T i / N with alpha_bar_i = ``alphas_cumprod[i - 1]`` (Ho et al. 2020's table, also
what ``discrete=True`` grids use, ``sde/samplers/schedules.build_grid``); diffusers indexes
the same table by timestep j = 0..N-1 as ``alphas_cumprod[j]``. So j = i - 1, and the
network is given

    t = T (j + 1) / N        (``time_of_timestep``; inverse ``timestep_of_time``)

Fractional j (EulerDiscrete's interpolated timesteps) map by the same affine formula, which
our continuous-time network accepts as it is. The schedulers are built from
``trained_betas = sde.betas`` (for the linear schedule exactly Ho et al.'s
``linspace(beta_min / N, beta_max / N, N)``), so their chain is our discrete chain, whose
alpha_bar lies within 2e-3 of the continuous alpha(t_i)^2 the network was trained on.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Sequence

import torch
from torch import nn

from sde.models.unet import norm_groups
from sde.network import CountedModel

Tensor = torch.Tensor

MISSING_DIFFUSERS = ("diffusers is not installed; this benchmark compares against it: "
                     "pip install diffusers (a benchmark-only install, not a toolkit dependency)")

#: The diffusers schedulers compared, by the short name the tables use.
SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "DPMSolverMultistepSDE": "DPMSolverMultistepScheduler",  # algorithm_type="sde-dpmsolver++"
    "UniPCMultistep": "UniPCMultistepScheduler",
    "EulerDiscrete": "EulerDiscreteScheduler",
    "DDPM": "DDPMScheduler",
    "EulerAncestralDiscrete": "EulerAncestralDiscreteScheduler",
}
#: The stochastic ones (fresh noise every step, drawn per sample like ours): DDPM's
#: ancestral sampling, Euler ancestral and SDE-DPM-Solver++ 2M (the counterpart of our
#: ``dpm_solver_sde``).
STOCHASTIC_SCHEDULERS = ("DDPM", "EulerAncestralDiscrete", "DPMSolverMultistepSDE")
#: diffusers' timestep spacings (Lin et al. 2024, "Common Diffusion Noise Schedules and
#: Sample Steps are Flawed", table 2).
SPACINGS = ("leading", "linspace", "trailing")
#: Schedulers that accept ``use_karras_sigmas`` (Karras et al. 2022, eq. 5 noise levels).
KARRAS_SCHEDULERS = ("DPMSolverMultistep", "DPMSolverMultistepSDE", "UniPCMultistep",
                     "EulerDiscrete")


def require_diffusers():
    """The diffusers module, or exit with a one-line message saying how to install it."""
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit(MISSING_DIFFUSERS)
    import diffusers

    return diffusers


def time_of_timestep(timestep: Tensor | float, sde) -> Tensor:
    """Our continuous t of diffusers' timestep j: t = T (j + 1) / N (module docstring)."""
    return sde.T * (torch.as_tensor(timestep, dtype=torch.float64) + 1.0) / sde.N


def timestep_of_time(t: Tensor, sde) -> Tensor:
    """Inverse of ``time_of_timestep``: j = N t / T - 1."""
    return sde.N * t / sde.T - 1.0


# ---- the matched U-Net -------------------------------------------------------------------

def matched_unet_kwargs(config) -> dict:
    """UNet2DModel arguments laid out as our U-Net of ``config`` (sde/models/unet.py): the
    same widths per level (nf * ch_mult), residual blocks per level, single-head attention
    at the same resolutions and in the middle block, time embedding of 4 nf, and the GroupNorm
    group count our U-Net gives its narrowest layers (one count for every layer in diffusers).
    """
    model, data = config.model, config.data
    widths = tuple(model.nf * mult for mult in model.ch_mult)
    resolutions = [data.image_size // 2 ** level for level in range(len(widths))]
    attention = [resolution in tuple(model.attn_resolutions) for resolution in resolutions]
    return {
        "sample_size": data.image_size,
        "in_channels": data.num_channels,
        "out_channels": data.num_channels,
        "block_out_channels": widths,
        "layers_per_block": model.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "attention_head_dim": None,  # None: one head over all channels, as ours
        "norm_num_groups": norm_groups(model.nf),
        "dropout": model.dropout,
    }


class DiffusersEps(nn.Module):
    """A diffusers UNet2DModel under our model contract: ``model(x, t) -> eps``, t in (0, 1],
    fed to it as the timestep ``timestep_of_time(t)``."""

    def __init__(self, unet: nn.Module, sde):
        super().__init__()
        self.unet = unet
        self.sde = sde

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, timestep_of_time(t, self.sde), return_dict=False)[0]


def matched_unet(config, sde) -> DiffusersEps:
    """diffusers' UNet2DModel laid out as our U-Net, behind our model contract."""
    diffusers = require_diffusers()
    return DiffusersEps(diffusers.UNet2DModel(**matched_unet_kwargs(config)), sde)


# ---- the schedulers ----------------------------------------------------------------------

def peer_label(name: str, spacing: str, karras: bool) -> str:
    return f"{name} ({'karras sigmas' if karras else spacing})"


def make_scheduler(name: str, sde, spacing: str = "linspace", karras: bool = False):
    """diffusers scheduler ``name`` (a key of ``SCHEDULERS``) on our SDE's DDPM chain.

    eps prediction, ``trained_betas = sde.betas``, no x0 clipping or thresholding (as our
    samplers' default ``clip_x0=False``), DDIM deterministic (eta = 0) with
    ``set_alpha_to_one`` so its last step lands on the data, as ours do; DDPM with its
    default posterior variance beta_tilde (our ``ancestral`` default); DPMSolverMultistepSDE
    is DPMSolverMultistep with ``algorithm_type="sde-dpmsolver++"``; ``karras`` uses
    Karras et al.'s noise levels instead of a timestep spacing.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")
    if karras and name not in KARRAS_SCHEDULERS:
        raise ValueError(f"{name} has no karras sigmas; accepted: {', '.join(KARRAS_SCHEDULERS)}")
    if not sde.supports_ddpm_betas():
        raise ValueError(f"{sde!r} has no DDPM beta table; the diffusers schedulers need a VP SDE")
    diffusers = require_diffusers()
    options = {"num_train_timesteps": sde.N, "trained_betas": sde.betas.numpy(),
               "prediction_type": "epsilon", "timestep_spacing": spacing}
    if name == "DDIM":
        options.update(clip_sample=False, set_alpha_to_one=True)
    if name == "DDPM":
        options["clip_sample"] = False
    if name == "DPMSolverMultistepSDE":
        options["algorithm_type"] = "sde-dpmsolver++"
    if karras:
        options["use_karras_sigmas"] = True
    return getattr(diffusers, SCHEDULERS[name])(**options)


def prior_noise(sde, shape: Sequence[int], generators: Sequence[torch.Generator]) -> Tensor:
    """x_T drawn as our samplers draw it (``NoiseSource.prior``): sample k from generator k."""
    one = (1,) + tuple(shape[1:])
    return torch.cat([sde.prior_sampling(one, generator=g) for g in generators])


@torch.no_grad()
def peer_sample(scheduler, model: Callable[[Tensor, Tensor], Tensor], sde, shape: Sequence[int], *,
                steps: int, generators: Sequence[torch.Generator],
                stochastic: bool = False) -> tuple[Tensor, int]:
    """Samples of our eps-network under a diffusers scheduler, and the counted NFE.

    The diffusers pipeline loop: x_T scaled by ``init_noise_sigma`` (1 for the VP-space
    schedulers; about sigma_max for EulerDiscrete, which works on x / alpha), then for every
    timestep j the model input ``scale_model_input(x, j)`` (the identity, or x / sqrt(1 +
    sigma^2) = our VP-space x_t for Euler), eps = model(input, T (j + 1) / N) and
    ``scheduler.step``, which for the ``stochastic`` schedulers draws the noise of sample k
    from generator k (diffusers' ``randn_tensor`` takes one generator per sample).
    """
    counted = CountedModel(model)
    step_options = {"generator": list(generators)} if stochastic else {}
    scheduler.set_timesteps(steps)
    x = prior_noise(sde, shape, generators) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, timestep)
        t = time_of_timestep(timestep, sde).to(x.dtype).expand(x.shape[0])
        eps = counted(model_input, t)
        x = scheduler.step(eps, timestep, x, return_dict=False, **step_options)[0]
    return x, counted.nfe
