"""Log-likelihoods of noise-prediction models: probability-flow ODE, bits/dim, and ELBOs.

Notation (sde/sdes.py): x_t = alpha(t) x_0 + sigma(t) z, the log-SNR
lambda(t) = log(alpha(t) / sigma(t)) (decreasing in t), the network eps_theta(x, t) and
the score -eps_theta / sigma(t).

The estimators live in three modules, along their seams:

* ``sde.likelihood.ode``: log p(x) by the probability-flow ODE (Song et al. 2021, eq. 39-40)
  and ``bits_per_dim`` of 8-bit images from it;
* ``sde.likelihood.dequantization``: uniform (Theis et al. 2016) and truncated-normal
  (Zheng et al. 2023) dequantization, the maps from a pixel pmf to a density;
* ``sde.likelihood.elbo``: the continuous-time bound (Kingma et al. 2021; Song et al.
  2021b) and the discrete DDPM bound (Ho et al. 2020, eq. 5), ``elbo_bits_per_dim``.

Every public name is importable from ``sde.likelihood`` itself.
"""
from sde.likelihood.common import mean_and_standard_error
from sde.likelihood.dequantization import (DEFAULT_TRUNCATION, DEQUANTIZATIONS, DEQUANTIZED_SLOPE,
                                           PLAIN_SLOPE, dequantized_bits_per_dim,
                                           truncated_normal_dequantization, truncation_time)
from sde.likelihood.elbo import (DEFENSIVE_FRACTION, PILOT_IMAGES, PROPOSAL_BINS, LogSnrProposal,
                                 continuous_negative_elbo, continuous_reconstruction_per_dim,
                                 ddpm_negative_elbo, discretized_gaussian_log_likelihood,
                                 elbo_bits_per_dim, gaussian_kl_to_prior_per_dim)
from sde.likelihood.ode import (ADAPTIVE_METHODS, DEFAULT_ATOL, DEFAULT_EPS, DEFAULT_RTOL,
                                DEFAULT_VARIABLE, DIVERGENCES, VARIABLES, bits_per_dim,
                                ode_log_likelihood)

__all__ = ["ADAPTIVE_METHODS", "DEFAULT_ATOL", "DEFAULT_EPS", "DEFAULT_RTOL", "DEFAULT_TRUNCATION",
           "DEFAULT_VARIABLE", "DEFENSIVE_FRACTION", "DEQUANTIZATIONS", "DEQUANTIZED_SLOPE",
           "DIVERGENCES", "LogSnrProposal", "PILOT_IMAGES", "PLAIN_SLOPE", "PROPOSAL_BINS",
           "VARIABLES", "bits_per_dim", "continuous_negative_elbo",
           "continuous_reconstruction_per_dim", "ddpm_negative_elbo", "dequantized_bits_per_dim",
           "discretized_gaussian_log_likelihood", "elbo_bits_per_dim",
           "gaussian_kl_to_prior_per_dim", "mean_and_standard_error", "ode_log_likelihood",
           "truncated_normal_dequantization", "truncation_time"]
