"""The exact noise predictor of a Gaussian-mixture toy set: a model with nothing to train.

For data p_0 = sum_k w_k N(mu_k, Sigma_k) and the forward process x_t = alpha_t x_0 +
sigma_t z of any of the SDEs (VP, sub-VP, VE), every marginal is again a mixture,

    p_t = sum_k w_k N(alpha_t mu_k, C_k(t)),   C_k(t) = alpha_t^2 Sigma_k + sigma_t^2 I,

so the score is grad log p_t(x) = -sum_k r_k(x, t) C_k(t)^{-1} (x - alpha_t mu_k) with the
responsibilities r_k = w_k N(x; alpha_t mu_k, C_k) / p_t(x), and the noise prediction the
samplers use is eps*(x, t) = -sigma_t grad log p_t(x) (Song et al. 2021, eq. 4 and the
score-noise identity of Ho et al. 2020's parameterisation). With it every sampler, the
likelihood and the toy pictures run on the true reverse process: what remains is the
sampler's own discretisation error and the prior mismatch at T.

As a class-conditional model (``num_classes`` = K, the number of components) label k is
component k: p_0(x | k) = N(mu_k, Sigma_k), whose noise prediction is the same formula
with r = one-hot(k); the null label K gives the whole mixture. This is the exact pair of
conditional and unconditional predictors that classifier-free guidance combines
(``sde.conditioning``).
"""
from __future__ import annotations

import torch
from torch import nn

from sde.data.toy import GaussianMixture
from sde.models.embeddings import check_labels

Tensor = torch.Tensor


class ExactMixtureEps(nn.Module):
    """``model(x, t) -> eps*`` of a Gaussian mixture under ``sde``, computed in float64.

    The mixture's weights, means and covariances are held as frozen float64 parameters, so
    the toolkit calls the model in float64 (``sde.network.CountedModel``) and counts them as
    the model's parameters: the closed form is all the model there is.
    """

    def __init__(self, sde, mixture: GaussianMixture, num_classes: int = 0):
        super().__init__()
        if num_classes not in (0, len(mixture.weights)):
            raise ValueError(f"the exact model's classes are the mixture's {len(mixture.weights)} components: "
                             f"model.num_classes must be 0 or {len(mixture.weights)}, got {num_classes}")
        self.sde = sde
        self.num_classes = num_classes
        self.weights = nn.Parameter(mixture.weights.clone(), requires_grad=False)
        self.means = nn.Parameter(mixture.means.clone(), requires_grad=False)
        self.covariances = nn.Parameter(mixture.covariances.clone(), requires_grad=False)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """eps* of the mixture at (x, t); with labels ``y`` (a conditional model), of component
        y for each sample (y = K: the mixture)."""
        if y is not None and not self.num_classes:
            raise ValueError("this exact model is unconditional (model.num_classes = 0): it takes no labels")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"the exact model expects x of shape [B, {self.dim}], got {list(x.shape)}")
        x64 = x.to(torch.float64)
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        alpha = self.sde.alpha(t64)[:, None, None, None]                         # [B, 1, 1, 1]
        sigma = self.sde.sigma(t64)[:, None, None, None]
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        covariance = alpha ** 2 * self.covariances[None] + sigma ** 2 * eye      # [B, K, D, D]
        diff = x64[:, None, :] - alpha[..., 0] * self.means[None]                # [B, K, D]
        cholesky = torch.linalg.cholesky(covariance)
        white = torch.linalg.solve_triangular(cholesky, diff[..., None], upper=False)  # L^{-1} diff
        log_det = 2 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)     # [B, K]
        log_weighted = torch.log(self.weights)[None] - 0.5 * (white[..., 0] ** 2).sum(-1) - 0.5 * log_det
        if y is not None:  # label k keeps component k alone; the null label K keeps them all
            y = check_labels(y, self.num_classes, x.shape[0]).to(x.device)
            components = torch.arange(self.num_classes, device=x.device)
            chosen = (y[:, None] == components[None]) | (y[:, None] == self.num_classes)
            log_weighted = log_weighted.masked_fill(~chosen, -torch.inf)
        responsibility = torch.softmax(log_weighted, dim=1)                      # [B, K]
        precision_diff = torch.linalg.solve_triangular(cholesky.transpose(-1, -2), white, upper=True)[..., 0]
        eps = sigma[:, 0, 0] * (responsibility[..., None] * precision_diff).sum(1)  # sigma C^{-1} diff
        return eps.to(x.dtype)
