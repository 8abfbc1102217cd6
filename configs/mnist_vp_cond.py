"""The class-conditional MNIST release: one U-Net for p(x | digit) and p(x), sampled with
classifier-free guidance (Ho & Salimans 2022).

    python main.py --config configs/mnist_vp_cond.py --mode train --workdir runs/mnist_vp_cond

The MNIST-10k protocol of ``mnist_vp_release.py`` (train on the 10,000 test-split digits
shipped in the package, hold out ``train5k``), the same VP-SDE and loss, with the labels: the
U-Net adds a learned embedding of the digit to its time embedding, and one label in ten is
dropped to "no label" during training, so the same weights give the unconditional eps that
guidance needs (``sde/conditioning.py``). To fit about an hour on 2 CPU cores without bf16
support, the network is the quick run's quarter-size U-Net (base width 16) without dropout,
trained for 5,000 steps of batch 128 (the release's 6,000 steps of a 1.1M-parameter network
take about 3 hours in fp32 on such a CPU) with a learning rate annealed along a half cosine.
On a CPU with AVX512-BF16 or AMX, or a GPU, add ``--config.training.amp=bf16``.

Sampling defaults to DPM-Solver++ at 20 steps of the balanced labels (class k mod 10).
BENCHMARKS.md ("Classifier-free guidance") measures it against the guidance scale.
"""
from configs.mnist_vp_release import get_config as get_release_config


def get_config():
    config = get_release_config()
    config.model.num_classes = 10
    config.model.label_dropout = 0.1
    config.model.nf = 16
    config.model.dropout = 0.0
    config.training.amp = "none"
    config.training.n_iters = 5000
    config.training.lr = 1e-3
    config.training.lr_schedule = "cosine"
    config.training.warmup = 200
    config.training.snapshot_freq = 500
    config.training.sample_freq = 2500
    config.sampling.method = "dpm_solver"
    config.sampling.steps = 20
    config.sampling.labels = "balanced"
    config.sampling.num_samples = 100
    config.sampling.batch_size = 100
    return config
