"""MNIST, VP-SDE (linear beta 0.1..20), continuous-time eps matching; sized for a CPU.

    python main.py --config configs/mnist_vp.py --mode train --workdir runs/mnist_vp

Trains on the 60k training split, downloaded (MD5 checked) into ``data.data_dir``; with no
internet the MNIST test split shipped in the package stands in, with a warning.
"""
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.sde.name = "vp"
    config.training.continuous = True
    # sized for a CPU: 1.1 M parameters, batch 128, 6,000 steps
    config.training.batch_size = 128
    config.training.n_iters = 6000
    config.training.snapshot_freq = 500
    config.training.sample_freq = 1000
    return config
