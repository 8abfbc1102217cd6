"""A first run that shows digits in minutes on 2 CPU cores.

    python main.py --config configs/mnist_quick.py --mode train

The MNIST-10k data of ``mnist_vp.py`` (shipped in the package: no download) with what makes
a network draw recognisable digits soonest on a CPU: a U-Net a quarter the size of
``mnist_vp.py``'s (base width 16: a quarter of the multiply-adds per image), batches of 64
(more optimizer steps per minute than 128), a learning rate of 2e-3 after a 50-step warm-up
(the largest that stayed stable in these short runs), no dropout (nothing to regularise in
1,200 steps) and an EMA that averages over the last hundred or so steps. Samples come from
DPM-Solver++ at 50 steps, which recognises better than 20 on so young a network.
BENCHMARKS.md ("The README's first run") has its time and how its digits score.
"""
from configs.mnist_vp import get_config as get_mnist_vp_config


def get_config():
    config = get_mnist_vp_config()
    config.model.nf = 16
    config.model.dropout = 0.0
    config.model.ema_rate = 0.99
    config.training.batch_size = 64
    config.training.n_iters = 1200
    config.training.lr = 2e-3
    config.training.warmup = 50
    config.training.log_freq = 50
    config.training.snapshot_freq = 400
    config.training.sample_freq = 1200
    config.sampling.method = "dpm_solver"
    config.sampling.steps = 50
    return config
