"""The released model fine-tuned for likelihood: 1,000 likelihood-weighted steps on top.

    python main.py --config configs/mnist_vp_release_lw.py --mode train --workdir runs/release_lw

Starts from ``release/mnist_vp_release.safetensors`` (``training.init_weights``; fresh Adam
state, the EMA restarts from the same weights) and trains with Song et al.'s (2021b)
likelihood weighting g(t)^2 of the score-matching loss, importance-sampled uniformly in
log-SNR (sde/losses.py), which puts the weight of the ELBO's integrand on the low-noise
steps where the probability-flow ODE's bits/dim are decided. The step count is what the
protocol's 2-hour training budget leaves after the release's own training (train_summary
files in release/). The learning rate is the default config's 2e-4 (the release trained at
5e-4), with a short warm-up for the fresh Adam moments. BENCHMARKS.md ("Bits/dim of
checkpoints") has the bits/dim along the fine-tune. Its eval reports bits/dim with
truncated-normal dequantization (tau = 2, chosen on training images).
"""
from configs.mnist_vp_release import get_config as get_release_config


def get_config():
    config = get_release_config()
    config.training.init_weights = "release/mnist_vp_release.safetensors"
    config.training.likelihood_weighting = True
    config.training.importance_sampling = True
    config.training.n_iters = 1000
    config.training.lr = 2e-4
    config.training.warmup = 100
    config.eval.bpd_dequantization = "truncated_normal"
    return config
