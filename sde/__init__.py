"""Score-SDE toolkit: one noise-prediction network, many samplers, honest metrics.

    import sde
    pipe = sde.load("release/mnist_vp_release.safetensors")   # model, sde, config
    x, info = pipe.sample(16, method="dpm_solver", steps=20)

``sde.load``, ``sde.exact_toy`` and ``Pipeline`` (``sde/api.py``), the SDEs (``sde/sdes.py``), the samplers
(``sde.samplers``), the likelihoods (``sde.likelihood``) and the latent space
(``sde.latent``) are the Python API.
"""
from sde import latent, likelihood, samplers
from sde.api import Pipeline, exact_toy, load
from sde.sdes import SDE, VPSDE, SubVPSDE, VESDE, create_sde

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "Pipeline", "create_sde", "exact_toy", "latent", "likelihood",
           "load", "samplers"]
