"""Toy data with an MLP and the VP-SDE: 2-D (spiral by default; gaussian, two_gaussians) and
1-D (gaussian_1d, two_gaussians_1d). The MLP's width and the 10,000 steps are what resolves
the spiral's two turns (a 3-layer, 128-wide MLP blurs its inner arm); about 5 minutes on 2
CPU cores. ``--config.model.name=exact`` replaces the MLP by the exact score of a Gaussian set
(nothing to train)."""
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    config.data.dataset = "toy"
    config.data.toy_name = "spiral"
    config.data.image_size = 0
    config.data.num_channels = 0
    config.model.name = "mlp"
    config.model.nf = 256
    config.model.num_layers = 4
    config.model.dropout = 0.0
    config.model.embedding_type = "fourier"
    config.model.ema_rate = 0.99
    config.training.batch_size = 512
    config.training.n_iters = 10000
    config.training.lr = 1e-3
    config.training.warmup = 100
    config.training.snapshot_freq = 1000
    config.training.sample_freq = 1000
    config.sampling.num_samples = 2000
    config.sampling.batch_size = 2000
    return config
