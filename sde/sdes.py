"""Forward SDEs of Song et al. 2021, "Score-Based Generative Modeling through SDEs".

Every SDE here is linear in ``x``, so its perturbation kernel is Gaussian with the form

    x_t = alpha(t) * x_0 + sigma(t) * z,        z ~ N(0, I)                          (1)

and the forward SDE ``dx = f(t) x dt + g(t) dw`` (their eq. 5) has

    f(t)   = d log alpha(t) / dt
    g(t)^2 = d sigma(t)^2 / dt - 2 f(t) sigma(t)^2                                   (2)

(differentiate Var[x_t] = alpha^2 Var[x_0] + sigma^2 along the SDE's moment equation
dVar/dt = 2 f Var + g^2). Subclasses give ``alpha``, ``sigma``, ``f`` and ``g^2``; the
base class turns them into the contract every loss, sampler and likelihood uses:
``sde``, ``marginal_prob``, ``prior_sampling``, ``prior_logp``, ``log_snr`` and its
inverse ``t_from_log_snr``, and the discrete grid of ``N`` steps (step ``i`` of ``N`` is
the time ``t_i = T * i / N``).

The model contract (``sde.network``; docs/design.md): the network predicts the noise
``eps``; the score is ``-eps / sigma(t)`` and the denoised estimate
``(x - sigma(t) eps) / alpha(t)``.
"""
from __future__ import annotations

import abc
import math

import torch

from sde import randomness

Tensor = torch.Tensor

#: Ho et al.'s linear schedule, beta_i = linspace(1e-4, 0.02, 1000), as a continuous-time
#: beta(t) = N * beta_{t N}: these are the VP defaults.
DEFAULT_BETA_MIN, DEFAULT_BETA_MAX = 0.1, 20.0


def _as_time(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    return torch.as_tensor(t, dtype=torch.float64 if like is None else like.dtype,
                           device=None if like is None else like.device)


def broadcast_to(values: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample ``values`` of shape [B] (or a scalar) to broadcast against ``x``."""
    values = values.to(dtype=x.dtype, device=x.device)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


class SDE(abc.ABC):
    """A linear forward SDE with the Gaussian marginals of eq. (1).

    Args:
      N: number of discrete steps of the time grid ``t_i = T i / N`` (i = 1..N) used by
        discrete-time training and the ancestral sampler.
    """

    #: terminal time of the forward process (time runs in [0, T]).
    T: float = 1.0

    def __init__(self, N: int):
        if N < 1:
            raise ValueError(f"the number of discrete steps N must be >= 1, got {N}")
        self.N = int(N)

    # ---- what a subclass defines -------------------------------------------------------
    @abc.abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t) of eq. (1)."""

    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t) of eq. (1)."""

    @abc.abstractmethod
    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) = d log alpha / dt, eq. (2)."""

    @abc.abstractmethod
    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g(t)^2 of eq. (2)."""

    @abc.abstractmethod
    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of ``log_snr``: the time at which log(alpha/sigma) equals ``log_snr``."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) approximating p_T."""

    # ---- the shared contract ----------------------------------------------------------
    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha(t) / sigma(t)), strictly decreasing in t."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift ``f(t) x`` and diffusion ``g(t)`` of the forward SDE (Song et al. eq. 5)."""
        drift = broadcast_to(self.drift_coef(t), x) * x
        return drift, torch.sqrt(self.diffusion_sq(t)).to(x.dtype)

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``alpha(t) x_0`` and std ``sigma(t)`` (shape [B]) of p_0t(x_t | x_0)."""
        return broadcast_to(self.alpha(t), x) * x, self.sigma(t).to(x.dtype)

    def prior_sampling(self, shape, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw x_T ~ N(0, prior_std^2 I), on ``device`` (default: the generator's)."""
        return self.prior_std * randomness.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I), summed over all but the batch dimension."""
        dim = z[0].numel()
        sq = z.flatten(1).pow(2).sum(1)
        return (-0.5 * dim * math.log(2 * math.pi * self.prior_std ** 2)
                - 0.5 * sq / self.prior_std ** 2)

    # ---- the discrete grid ------------------------------------------------------------
    @property
    def discrete_times(self) -> Tensor:
        """t_i = T i / N for i = 1..N (float64): the time of discrete step i."""
        return self.T * torch.arange(1, self.N + 1, dtype=torch.float64) / self.N

    def discrete_alpha_sigma(self) -> tuple[Tensor, Tensor]:
        """(alpha_i, sigma_i) of the discrete process at steps i = 1..N (float64).

        The default is the continuous marginal at ``t_i``; VP overrides it with the DDPM
        tables so that discrete models and the ancestral sampler use Ho et al.'s chain.
        """
        t = self.discrete_times
        return self.alpha(t), self.sigma(t)

    def supports_ddpm_betas(self) -> bool:
        """True where a DDPM Markov chain with per-step betas exists (VP only)."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.N})"


class VPSDE(SDE):
    """Variance-preserving SDE, dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (Song et al. eq. 11).

    ``schedule="linear"``: beta(t) = beta_min + t (beta_max - beta_min), so
    log alpha(t) = -t beta_min / 2 - t^2 (beta_max - beta_min) / 4; its discrete tables are
    Ho et al.'s ``betas = linspace(beta_min / N, beta_max / N, N)`` exactly.

    ``schedule="cosine"``: alpha(t) = cos(u(t)) / cos(u(0)) with u(t) = pi/2 (t + s)/(1 + s)
    (Nichol & Dhariwal 2021, eq. 17, alpha_bar = alpha^2). Its beta(t) diverges at t = 1,
    so the process stops at the time ``T`` where its log-SNR equals the linear default's
    log-SNR at t = 1: both schedules then leave the same gap to the N(0, I) prior. The
    discrete tables take alpha_bar_i = alpha(t_i)^2 at t_i = T i / N (no beta clipping
    needed, since T < 1).

    Discrete vs continuous (linear, N=1000, beta 0.1..20): the DDPM product
    prod(1 - beta_j) is a left Riemann sum of exp(-int beta), so
    |alphas_cumprod_i - alpha(t_i)^2| <= 2e-3 for every i (tests check this bound).
    """

    def __init__(self, beta_min: float = DEFAULT_BETA_MIN, beta_max: float = DEFAULT_BETA_MAX,
                 N: int = 1000, schedule: str = "linear", cosine_s: float = 0.008):
        super().__init__(N)
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown VP schedule {schedule!r}; accepted: 'linear', 'cosine'")
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.schedule = schedule
        self.cosine_s = float(cosine_s)
        if schedule == "cosine":
            # terminal log-SNR of the linear default at t = 1, from its closed form
            log_alpha_1 = -0.5 * DEFAULT_BETA_MIN - 0.25 * (DEFAULT_BETA_MAX - DEFAULT_BETA_MIN)
            log_snr_1 = log_alpha_1 - 0.5 * math.log(-math.expm1(2 * log_alpha_1))
            self.T = float(self.t_from_log_snr(torch.tensor(log_snr_1, dtype=torch.float64)))

    # cosine helpers
    def _u(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * (t + self.cosine_s) / (1.0 + self.cosine_s)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        if self.schedule == "linear":
            return -0.5 * t * self.beta_min - 0.25 * t ** 2 * (self.beta_max - self.beta_min)
        return torch.log(torch.cos(self._u(t))) - math.log(math.cos(self._u(torch.tensor(0.0)).item()))

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = -2 d log alpha / dt."""
        t = _as_time(t)
        if self.schedule == "linear":
            return self.beta_min + t * (self.beta_max - self.beta_min)
        return math.pi / (1.0 + self.cosine_s) * torch.tan(self._u(t))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  -2 log alpha = softplus(-2 lambda)
        neg_two_log_alpha = torch.nn.functional.softplus(-2.0 * log_snr)
        if self.schedule == "linear":
            # solve beta_min t + (beta_max - beta_min) t^2 / 2 = B for t >= 0 (stable root)
            delta = self.beta_max - self.beta_min
            return 2.0 * neg_two_log_alpha / (
                self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * delta * neg_two_log_alpha))
        cos_u0 = math.cos(self._u(torch.tensor(0.0)).item())
        u = torch.arccos(torch.exp(-0.5 * neg_two_log_alpha) * cos_u0)
        return u * 2.0 * (1.0 + self.cosine_s) / math.pi - self.cosine_s

    @property
    def prior_std(self) -> float:
        return 1.0

    @property
    def betas(self) -> Tensor:
        """DDPM betas for N steps (float64); Ho et al.'s linspace(1e-4, 0.02, 1000) at the defaults."""
        if self.schedule == "linear":
            return torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N,
                                  dtype=torch.float64)
        alpha_bar = self.alpha(self.discrete_times) ** 2
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return 1.0 - alpha_bar / previous

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha_bar_i = prod_{j <= i} (1 - beta_j), i = 1..N (float64)."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def discrete_alpha_sigma(self) -> tuple[Tensor, Tensor]:
        alpha_bar = self.alphas_cumprod
        return torch.sqrt(alpha_bar), torch.sqrt(1.0 - alpha_bar)

    def supports_ddpm_betas(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (f"VPSDE(schedule={self.schedule!r}, beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}, N={self.N}, T={self.T:.6g})")


class SubVPSDE(VPSDE):
    """Sub-VP SDE, dx = -beta/2 x dt + sqrt(beta (1 - exp(-2 int_0^t beta))) dw (Song et al. eq. 12).

    Same alpha(t) as VP; sigma(t) = 1 - alpha(t)^2, which lies below the VP sigma, so
    eq. (2) gives g^2 = beta(t) (1 - alpha(t)^4). Linear beta schedule only.
    """

    def __init__(self, beta_min: float = DEFAULT_BETA_MIN, beta_max: float = DEFAULT_BETA_MAX,
                 N: int = 1000):
        super().__init__(beta_min=beta_min, beta_max=beta_max, N=N, schedule="linear")

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(2.0 * self.log_alpha(t))

    def log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - torch.log(-torch.expm1(2.0 * log_alpha))

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return -self.beta(t) * torch.expm1(4.0 * self.log_alpha(t))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # alpha / (1 - alpha^2) = e^lambda  =>  alpha = 2 e^lambda / (1 + sqrt(1 + 4 e^{2 lambda}))
        #                                          = 2 / (e^-lambda + sqrt(e^-2lambda + 4)),
        # taken in logs on the side where the exponential cannot overflow (an adaptive solver's
        # first-step probe may ask for any lambda)
        low = torch.clamp(log_snr, max=0.0)
        high = torch.clamp(log_snr, min=0.0)
        log_alpha_low = low + math.log(2.0) - torch.log1p(torch.sqrt(1.0 + 4.0 * torch.exp(2.0 * low)))
        log_alpha_high = math.log(2.0) - torch.log(torch.exp(-high) + torch.sqrt(torch.exp(-2.0 * high) + 4.0))
        neg_two_log_alpha = -2.0 * torch.where(log_snr < 0, log_alpha_low, log_alpha_high)
        delta = self.beta_max - self.beta_min
        return 2.0 * neg_two_log_alpha / (
            self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * delta * neg_two_log_alpha))

    @property
    def betas(self) -> Tensor:
        raise NotImplementedError(
            "sub-VP has no DDPM beta table (its marginals are not a VP Markov chain); "
            "use discrete_alpha_sigma() or a VPSDE")

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.betas  # raises the same explanation

    def discrete_alpha_sigma(self) -> tuple[Tensor, Tensor]:
        return SDE.discrete_alpha_sigma(self)

    def supports_ddpm_betas(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N})"


class VESDE(SDE):
    """Variance-exploding SDE, dx = sqrt(d sigma^2/dt) dw (Song et al. eq. 9).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t and alpha(t) = 1. As in the reference
    implementation, x_t = x_0 + sigma(t) z holds exactly for the SDE started from the
    data smoothed by N(0, sigma_min^2): the process begins at x(0) = x_0 + sigma_min z.
    Then g(t)^2 = d sigma^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_time(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(_as_time(t) * self._log_ratio)

    def log_snr(self, t: Tensor) -> Tensor:
        return -(math.log(self.sigma_min) + _as_time(t) * self._log_ratio)

    def drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_time(t))

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return 2.0 * self._log_ratio * self.sigma(t) ** 2

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (-log_snr - math.log(self.sigma_min)) / self._log_ratio

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"


def _vp(config) -> VPSDE:
    cfg = config.sde
    return VPSDE(cfg.beta_min, cfg.beta_max, cfg.num_scales, schedule=cfg.schedule)


def _subvp(config) -> SubVPSDE:
    cfg = config.sde
    if cfg.schedule != "linear":
        raise ValueError(f"sde.schedule={cfg.schedule!r} is not defined for subvp; accepted: 'linear'")
    return SubVPSDE(cfg.beta_min, cfg.beta_max, cfg.num_scales)


def _ve(config) -> VESDE:
    cfg = config.sde
    return VESDE(cfg.sigma_min, cfg.sigma_max, cfg.num_scales)


#: ``config.sde.name`` -> a builder reading the config's ``sde`` section.
SDES = {"vp": _vp, "subvp": _subvp, "ve": _ve}


def create_sde(config) -> SDE:
    """Build the SDE named by ``config.sde.name`` (``SDES``)."""
    name = config.sde.name
    if name not in SDES:
        raise ValueError(f"unknown sde.name {name!r}; accepted: {', '.join(SDES)}")
    return SDES[name](config)
