"""CIFAR-10 32x32x3, VP-SDE, continuous-time eps matching: a GPU configuration.

    python main.py --config configs/cifar10_vp.py --mode train --workdir runs/cifar10_vp

The reference point is score_sde's DDPM++ with the continuous VP-SDE (Song et al. 2021,
``configs/vp/cifar10_ddpmpp_continuous.py``; FID 2.55 with the predictor-corrector sampler in
their Table 3). Taken from it unchanged: beta 0.1 -> 20, nf = 128, ch_mult = (1, 2, 2, 2),
4 residual blocks per level, attention at 16x16, dropout 0.1, residual outputs rescaled by
1/sqrt(2), sinusoidal time embedding, EMA 0.9999, Adam at 2e-4 with 5,000 warm-up steps,
gradient clipping at 1, batch 128, random flips, 1.3 M steps.

Where it differs, and why:

* resampling: a stride-2 conv3x3 down and nearest x2 + conv3x3 up (DDPM's), where DDPM++
  resamples inside BigGAN-style residual blocks (``resblock_type='biggan'``); this U-Net has
  one residual block type, for every data set (58.7 M parameters at these widths and depths).
* bf16 autocast (``training.amp``): the GPU's tensor cores; score_sde trains in float32.
  ``--config.training.amp=none`` trains in float32 (TF32 matmuls, ``config.tf32``).
* sampling and eval default to ``dpm_solver_sde`` at 50 steps, where score_sde samples with
  Euler-Maruyama at 1,000 steps: on the released MNIST model the SDE-DPM-Solver++ comes within
  10 % of ancestral sampling at 1,000 steps by 50 steps (BENCHMARKS.md, sampler quality);
  ``--config.sampling.method=euler_maruyama --config.sampling.steps=1000`` is score_sde's.
* FID of 50,000 samples against the 50,000 training images, as the paper reports it.

The data (163 MB) are downloaded from the CIFAR-10 site into ``data.data_dir`` and MD5
checked; a class filter keeps some classes only: ``--config.data.classes="(0,)"``.
"""
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.random_flip = True
    config.model.nf = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.ema_rate = 0.9999
    config.training.batch_size = 128
    config.training.n_iters = 1_300_000
    config.training.lr = 2e-4
    config.training.warmup = 5000
    config.training.grad_clip = 1.0
    config.training.amp = "bf16"
    config.training.snapshot_freq = 10_000
    config.training.sample_freq = 50_000
    config.training.log_freq = 100
    config.sampling.method = "dpm_solver_sde"
    config.sampling.steps = 50
    config.sampling.batch_size = 500
    config.eval.num_samples = 50_000
    config.eval.batch_size = 500
    return config
