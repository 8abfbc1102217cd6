"""What the tests and the benchmarks share (not used by the toolkit itself).

* ``oracles``: exact noise predictors of Gaussian mixtures, whose every noised marginal is
  known in closed form: a perfectly trained network for checking samplers and likelihoods.
* ``faults``: the bad inputs and the tiny training run of the fault suite
  (tests/test_faults.py) and its benchmark (``python -m bench.fault_injection``).
"""
from sde.testing.faults import (BAD_INPUTS, MNIST_DIR, TINY_ARGS, BadInput, TouchMarker, cli_command,
                                make_tiny_config)
from sde.testing.oracles import GaussianMixtureOracle

__all__ = ["BAD_INPUTS", "BadInput", "GaussianMixtureOracle", "MNIST_DIR", "TINY_ARGS", "TouchMarker",
           "cli_command", "make_tiny_config"]
