"""MNIST, VP-SDE (linear beta 0.1..20), continuous-time eps matching; sized for a CPU.

    python main.py --config configs/mnist_vp.py --mode train --workdir runs/mnist_vp

The MNIST-10k protocol: trains on the official test split (10,000 images) and holds out
``train5k`` (5,000 training-split images), both shipped in the package, so it runs with no
data files and no network. Full MNIST: ``--config.data.split=train`` (60,000 images,
downloaded once into ``data.data_dir``, MD5-checked) with ``--config.eval.heldout_split=test``.
"""
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.split = "test"
    config.eval.heldout_split = "train5k"
    config.sde.name = "vp"
    config.training.continuous = True
    # sized for a CPU: 1.1 M parameters, batch 128, 6,000 steps
    config.training.batch_size = 128
    config.training.n_iters = 6000
    config.training.snapshot_freq = 500
    config.training.sample_freq = 1000
    return config
