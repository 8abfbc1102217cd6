"""``--mode train``: the training loop, its checkpoints, logging and resume.

One step: draw a batch from the resumable data stream, compute the configured loss
(sde/losses.py), back-propagate (optionally under bf16 autocast), skip the step if the
loss or the gradient is not finite, clip the gradient norm, take an Adam step with linear
warm-up, update the EMA. Every ``snapshot_freq`` steps (and on SIGTERM / SIGINT) the full
training state is written atomically; the next run in the same workdir resumes from the
newest readable checkpoint, bit-identically on CPU.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from sde import checkpoint, conditioning, configuration, data, distributed, environment, randomness, samplers
from sde.checks import require
from sde.conditioning import labelled
from sde.configuration import sampler_options
from sde.divergence import DivergenceGuard, TrainingDiverged
from sde.inference import load_weights
from sde.losses import LossConfig, make_loss_fn
from sde.progress import bar as progress_bar
from sde.models import count_parameters, create_model, is_exact
from sde.sdes import create_sde
from sde.workdir import TrainingLock, Workdir, WorkdirError

log = logging.getLogger(__name__)

__all__ = ["TrainingDiverged", "check", "run", "train"]


class EMA:
    """Exponential moving average of parameters: ema <- d * ema + (1 - d) * param.

    The decay ramps up as d = min(rate, (1 + n) / (10 + n)) after n updates (the schedule
    of TensorFlow's ExponentialMovingAverage with num_updates). Without it the average
    keeps for thousands of steps a large weight on the zero-output initial network, and
    an eps-network whose output is shrunk by even 5% near t = T drives samplers off the
    data: x0_hat = (x - sigma eps) / alpha amplifies the shrinkage by 1 / alpha(T) ~ 150.
    """

    def __init__(self, model: torch.nn.Module, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"model.ema_rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self, num_updates: int) -> float:
        return min(self.rate, (1.0 + num_updates) / (10.0 + num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        """Fold in ``model`` after ``num_updates`` earlier updates (the training step)."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay(num_updates))
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


#: ``training.amp``: the autocast precision of the training step's forward pass.
PRECISIONS = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision(amp: Any) -> str:
    """``training.amp`` as one of ``PRECISIONS``; the True / False of older configs,
    checkpoints and weight metadata mean bf16 / none."""
    if isinstance(amp, bool) or amp is None:
        return "bf16" if amp else "none"
    if amp not in PRECISIONS:
        raise ValueError(f"training.amp must be one of {', '.join(PRECISIONS)} (or True / False: bf16 / "
                         f"none), got {amp!r}")
    return amp


#: ``training.lr_schedule``: the learning rate after the linear warm-up.
LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a linear warm-up over
    ``training.warmup`` steps, then ``training.lr`` held (``constant``) or annealed to zero at
    ``n_iters`` along a half cosine (``cosine``, Loshchilov & Hutter 2017, SGDR's eq. 5 with
    one cycle): a short run ends on small steps, which a constant rate never takes. The
    schedule follows the current ``n_iters``: a run resumed with more steps climbs back up the
    cosine from where the longer schedule is at that step."""
    train_cfg = config.training
    rate = train_cfg.lr * min(1.0, (step + 1) / max(1, train_cfg.warmup))
    if train_cfg.lr_schedule == "cosine" and step >= train_cfg.warmup:
        span = max(1, train_cfg.n_iters - train_cfg.warmup)
        rate *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - train_cfg.warmup) / span)))
    return rate


def autocast_context(device: torch.device, amp: Any):
    """Autocast in ``precision(amp)``: bf16 where the device supports it (CPUs with
    AVX512-BF16 or AMX, Ampere+ GPUs), fp16 on GPUs (with a gradient scaler, ``train``)."""
    dtype = PRECISIONS[precision(amp)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state(noise_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state a resume needs, as CPU tensors (``sde.randomness``)."""
    state = {"torch": randomness.get_state(), "noise": randomness.get_state(noise_generator)}
    if torch.cuda.is_available():
        state["cuda"] = [cuda_state.cpu() for cuda_state in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], noise_generator: torch.Generator) -> None:
    """Restore ``rng_state``'s states, wherever a checkpoint load put the tensors."""
    randomness.set_state(state["torch"])
    randomness.set_state(state["noise"], noise_generator)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in state["cuda"]])


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def flag(self, device: torch.device) -> torch.Tensor:
        """1.0 if this rank got a signal, as a tensor to sum over ranks with the step's loss."""
        return torch.tensor(float(self.signal_name is not None), device=device)

    def requested(self, count: float) -> bool:
        """Whether any rank got a signal (``count``: the flags summed over ranks): all ranks
        leave the loop at the same step."""
        if count == 0:
            return False
        self.signal_name = self.signal_name or "stop request of another rank"
        return True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def sample_grid(config, ema_model: torch.nn.Module, sde, device: torch.device, count: int = 64):
    """A fixed-seed batch from the configured sampler (for TensorBoard / PNG during training);
    a conditional network draws the classes in turn (one per grid column), unguided."""
    shape = data.sample_shape(config, count)
    generator = torch.Generator(device=device).manual_seed(config.sampling.seed)
    classes = conditioning.num_classes(ema_model)
    labels = (conditioning.resolve_labels(conditioning.BALANCED, count, classes, trained=tuple(config.data.classes))
              if classes else None)
    x, _ = samplers.sample(config.sampling.method, conditioning.bind(ema_model, labels), sde, shape,
                           steps=config.sampling.steps, generator=generator, disable=True,
                           **sampler_options(config))
    return x


def drop_labels(labels: Tensor, num_classes: int, probability: float, generator: torch.Generator,
                shard: tuple[int, int]) -> Tensor:
    """Labels with each replaced by the null label ``num_classes`` with ``probability``: the
    unconditional branch of classifier-free guidance, trained by the same steps (Ho & Salimans
    2022, Algorithm 1). The draws are for the global batch (this rank keeps its rows), so a
    run on several processes drops the labels a single process would."""
    rank, world = shard
    batch = labels.shape[0]
    uniform = randomness.rand((batch * world,), generator=generator, device=labels.device)[
        rank * batch:(rank + 1) * batch]
    return torch.where(uniform < probability, torch.full_like(labels, num_classes), labels)


def check(config) -> None:
    """The config of a training run: one clear ValueError on the first problem."""
    configuration.validate(config)  # every numeric key's rule among them (sde/config_rules.py)
    require(not is_exact(config), "model.name='exact' is the closed-form score of the toy set: it has nothing "
            "to train; use it with --mode sample / eval, or train model.name='mlp'")
    training = config.training
    require(training.continuous or not training.likelihood_weighting,
            "training.likelihood_weighting needs training.continuous=True")
    require(not training.p2_gamma or (training.continuous and not training.likelihood_weighting),
            "training.p2_gamma reweights the plain continuous loss: it needs training.continuous=True and "
            "training.likelihood_weighting=False")
    require(training.continuous or config.sde.name == "vp",
            f"training.continuous=False (DDPM) needs sde.name='vp', got {config.sde.name!r}")
    precision(training.amp)
    require(training.lr_schedule in LR_SCHEDULES,
            f"training.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {training.lr_schedule!r}")
    require(isinstance(training.compile, bool), f"training.compile must be True or False, got {training.compile!r}")
    if training.init_weights:
        require(Path(training.init_weights).suffix in (".safetensors", ".pt"),
                f"training.init_weights must be .safetensors weights or a checkpoint .pt, "
                f"got {training.init_weights!r}")
        require(Path(training.init_weights).is_file(),
                f"training.init_weights={training.init_weights!r} does not exist")
    configuration.check_sampling(config)  # the sample grids written during training


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode train``: check the config, then train; the summary with a printed message."""
    check(config)
    summary = train(config, workdir)
    summary["message"] = (f"trained to step {summary['step']} in {summary['wall_time_s']:.0f} s; "
                          f"last loss {summary['last_loss']:.4f}; workdir {workdir}")
    return summary


#: Config keys a run must keep when it resumes: what the network computes and what it is
#: fitted to (the SDE, the architecture, the data's content, discrete or continuous time).
#: Paths may move and the optimisation (learning rate, batch size, steps) may change.
RESUME_KEYS = {
    "sde": None,  # every key
    "model": ("name", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "embedding_type",
              "fourier_scale", "skip_rescale", "num_layers", "num_classes"),
    "data": ("dataset", "split", "classes", "image_size", "num_channels", "dequantize", "toy_name",
             "toy_num_samples"),
    "training": ("continuous",),
}


def check_resume(config, run: Workdir) -> None:
    """Refuse to resume the checkpoints in ``run`` under a config that changes ``RESUME_KEYS``
    from the run's ``config.json``: one ValueError naming every changed key."""
    stored_path = run.root / "config.json"
    if not checkpoint.list_checkpoints(run.checkpoints) or not stored_path.is_file():
        return
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, ValueError) as error:
        log.warning("cannot read %s (%s): the config of the resumed run is not compared", stored_path, error)
        return
    current = json.loads(json.dumps(config.to_dict(), default=list))
    changed = []
    for group, keys in RESUME_KEYS.items():
        old, new = stored.get(group, {}), current.get(group, {})
        for key in keys or sorted(new):
            if key in old and key in new and old[key] != new[key]:
                changed.append(f"{group}.{key}={new[key]!r} (the run: {old[key]!r})")
    if changed:
        raise ValueError(f"workdir {run.root} holds a run trained with another config: {'; '.join(changed)}. "
                         f"Resume with the run's config ({stored_path}), pass another --workdir, or start a "
                         f"new run from its weights with --config.training.init_weights=<a checkpoint of "
                         f"{run.checkpoints}> in a new --workdir")


#: Devices with torch's fused Adam kernel.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1) with torch's fused kernel where the device has one:
    one pass over all parameters per step instead of several small operations per tensor, the
    same update up to float rounding. A run resumed from a checkpoint keeps the kernel choice
    saved with its optimizer state."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True if device.type in FUSED_ADAM_DEVICES else None)


def train(config, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) in ``workdir``; returns a summary (steps, wall time, last loss).
    The config is assumed checked (``run`` checks it first). One trainer per workdir: the
    main process holds ``TrainingLock`` for the whole run."""
    context = distributed.setup(config.device, config.tf32)
    run = Workdir(workdir, create=context.is_main)
    lock = TrainingLock(run.root)
    refusal = None
    if context.is_main:
        try:
            lock.acquire()
        except WorkdirError as error:
            refusal = error
    if distributed.all_reduce_sum(torch.tensor(float(refusal is not None), device=context.device)).item():
        raise refusal or WorkdirError(f"the main process could not take the training lock of {run.root}")
    try:
        check_resume(config, run)
        if context.is_main:
            run.prepare_checkpoints()
        return _train(config, run, context)
    finally:
        lock.release()


def _train(config, run: Workdir, context: distributed.Context) -> dict[str, Any]:
    device = context.device
    torch.manual_seed(config.seed)  # the same initial weights (hence EMA) on every rank
    noise_generator = torch.Generator(device=device).manual_seed(config.seed)

    train_cfg = config.training
    stream = data.create_batch_stream(config, rank=context.rank, world_size=context.world_size)
    classes = config.model.num_classes  # > 0: the stream yields (images, labels)

    model = create_model(config).to(device)
    if context.world_size > 1:
        torch.manual_seed(config.seed + context.rank)  # dropout differs per rank; noise does not
    mode = precision(train_cfg.amp)
    running_on = environment.announce(device, processes=context.world_size, model=model, autocast=mode,
                                      show=context.is_main)
    if context.is_main:
        print(f"data: {data.describe(config, len(stream.data))}", flush=True)
        print(f"model: {config.model.name}, {count_parameters(model):,} parameters", flush=True)
    ema = EMA(model, config.model.ema_rate)
    optimizer = make_optimizer(model, train_cfg.lr, device)
    # fp16's narrow range needs the loss scaled (Micikevicius et al. 2018); disabled, the
    # scaler passes everything through unchanged
    scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
    sde = create_sde(config)
    loss_fn = make_loss_fn(sde, LossConfig(continuous=train_cfg.continuous,
                                           likelihood_weighting=train_cfg.likelihood_weighting,
                                           importance_sampling=train_cfg.importance_sampling,
                                           eps=train_cfg.eps, p2_gamma=train_cfg.p2_gamma, p2_k=train_cfg.p2_k))

    step = 0
    earlier_wall_time = 0.0  # training seconds of the runs this one resumes
    guard = DivergenceGuard(train_cfg.divergence_factor)
    restored = checkpoint.load_latest(run.checkpoints, map_location=device, required=checkpoint.TRAINING_ENTRIES)
    if restored is not None:
        step, state = restored
        earlier_wall_time = float(state.get("wall_time_s", 0.0))
        checkpoint.load_model_weights(model, state["model"], f"checkpoint of step {step}")
        checkpoint.load_model_weights(ema.model, state["ema"], f"EMA of checkpoint of step {step}")
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"], noise_generator)
        guard.load_state_dict(state.get("divergence", {}))
        if context.is_main:
            print(f"resumed from {run.checkpoints}/checkpoint_{step}.pt (step {step})", flush=True)
    elif train_cfg.init_weights:  # fine-tuning: step 0 and a fresh optimizer, given weights
        source_step = load_weights(model, config, Path(train_cfg.init_weights))
        ema.model.load_state_dict(model.state_dict())
        if context.is_main:
            print(f"initialised from {train_cfg.init_weights} (its step {source_step})", flush=True)
    guard.start(model)
    if context.is_main:
        run.write_config(config, environment=running_on)

    train_model = model
    if context.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if train_cfg.compile:
        train_model = torch.compile(train_model)

    batches = data.DevicePrefetcher(stream, device)  # after the restore: it reads ahead
    first_step = step

    def training_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "ema": ema.model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step,
                **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                "data": batches.state_dict(), "rng": rng_state(noise_generator),
                "divergence": guard.state_dict(),
                "wall_time_s": earlier_wall_time + time.perf_counter() - start}

    def snapshot() -> None:
        """Save the state, unless it has diverged: then it must not replace a good checkpoint."""
        weights = list(model.parameters()) + list(ema.model.parameters())
        finite = all(torch.isfinite(w).all() for w in weights)
        reason = guard.check(model) if finite else "the weights hold non-finite values"
        if reason is not None:
            raise TrainingDiverged(f"training diverged by step {step}: {reason}. This state was not saved; "
                                   f"{_last_good(run)} Lower training.lr (now {train_cfg.lr:g}) and run the "
                                   f"same command to resume from there, or set training.divergence_factor=0 "
                                   f"to turn this check off")
        if context.is_main:
            checkpoint.save_checkpoint(run.checkpoints, step, training_state(),
                                       keep=train_cfg.keep_checkpoints)

    writer = SummaryWriter(str(run.tensorboard)) if context.is_main else None
    bad_steps_in_a_row = bad_steps_total = overflow_steps = host_syncs = 0
    last_loss = float("nan")
    recent_losses: collections.deque[float] = collections.deque(maxlen=train_cfg.log_freq)
    images_seen, window_start = 0, time.perf_counter()
    start = time.perf_counter()
    progress = progress_bar(desc="train", unit="step", total=train_cfg.n_iters, initial=step,
                            disable=not context.is_main)
    with _StopRequest() as stop, contextlib.closing(progress):  # the bar ends before any error line
        while step < train_cfg.n_iters:
            x0, labels = batches.take() if classes else (batches.take(), None)
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, mode):
                if classes:
                    labels = drop_labels(labels, classes, config.model.label_dropout, noise_generator,
                                         context.shard)
                loss = loss_fn(labelled(train_model, labels), x0, generator=noise_generator, shard=context.shard)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf)
            batches.prefetch()  # the next batch is made while the device computes this one
            # The step's one host synchronisation, which the update must wait for: the global
            # batch's loss (summed over ranks with their stop requests, in one collective) and
            # the gradient norm, the same on every rank (the gradient is all-reduced), so that
            # every rank takes the same branch below.
            reduced = distributed.all_reduce_sum(torch.stack([loss.detach().float(), stop.flag(device)]))
            global_loss, gradient_norm, stops = torch.stack(
                [reduced[0] / context.world_size, grad_norm.float(), reduced[1]]).tolist()
            host_syncs += 1
            finite_loss, finite_gradient = math.isfinite(global_loss), math.isfinite(gradient_norm)
            if scaler.is_enabled() and finite_loss and not finite_gradient:
                # the fp16 gradients overflowed at this loss scale: the scaler skips the step and
                # lowers the scale; not a bad step
                scaler.step(optimizer)
                scaler.update()
                overflow_steps += 1
                continue
            if not (finite_loss and finite_gradient):
                if scaler.is_enabled():
                    scaler.update()  # closes this step's unscale_; the optimizer does not step
                bad_steps_in_a_row += 1
                bad_steps_total += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                            step + 1, bad_steps_in_a_row)
                if bad_steps_in_a_row >= train_cfg.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_steps_in_a_row} non-finite steps in a row at step {step + 1} "
                        f"(training.max_bad_steps={train_cfg.max_bad_steps}); {_last_good(run)} "
                        f"Lower training.lr or check the data.")
                continue
            bad_steps_in_a_row = 0
            scaler.step(optimizer)  # with fp16, one more synchronisation: the scaler's overflow check
            host_syncs += int(scaler.is_enabled())
            scaler.update()
            ema.update(model, step)
            step += 1
            last_loss = global_loss
            recent_losses.append(last_loss)
            guard.observe(last_loss)
            images_seen += x0.shape[0] * context.world_size
            progress.update(1)

            if step % train_cfg.log_freq == 0 or step == train_cfg.n_iters:
                elapsed = time.perf_counter() - window_start
                images_per_sec = images_seen / max(elapsed, 1e-9)
                progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_sec:.0f}")
                if writer is not None:
                    for name, value in (("loss", last_loss), ("learning_rate", lr),
                                        ("grad_norm", gradient_norm),
                                        ("images_per_sec", images_per_sec),
                                        ("bad_steps", bad_steps_total),
                                        ("overflow_steps", overflow_steps)):
                        writer.add_scalar(f"train/{name}", value, step)
                images_seen, window_start = 0, time.perf_counter()
            if step % train_cfg.snapshot_freq == 0 or step == train_cfg.n_iters:
                snapshot()
            if context.is_main and (step % train_cfg.sample_freq == 0 or step == train_cfg.n_iters):
                _write_samples(config, ema.model, sde, device, run, writer, step, stream.data)
            if stop.requested(stops):
                snapshot()
                if context.is_main:
                    print(f"\n{stop.signal_name} received: saved checkpoint of step {step}; "
                          f"run the same command to resume", flush=True)
                break
    if writer is not None:
        writer.close()
    summary = {"step": step, "wall_time_s": time.perf_counter() - start,
               "total_wall_time_s": earlier_wall_time + time.perf_counter() - start,
               "last_loss": last_loss,
               "mean_loss_last_steps": sum(recent_losses) / max(1, len(recent_losses)),
               "last_steps": len(recent_losses), "bad_steps": bad_steps_total,
               "overflow_steps": overflow_steps,
               "host_syncs_per_step": host_syncs / max(1, step - first_step),
               "parameters": count_parameters(model), "interrupted": stop.signal_name,
               "environment": running_on}
    if context.is_main:
        run.write_json("train_summary.json", summary)
    distributed.barrier()
    return summary


def _last_good(run: Workdir) -> str:
    """What the checkpoints of ``run`` hold now, as a sentence for a divergence message."""
    saved = checkpoint.list_checkpoints(run.checkpoints)
    if not saved:
        return "no checkpoint was saved before it, so a rerun starts from scratch."
    return f"the newest checkpoint, {saved[-1][1]} (step {saved[-1][0]}), is from before and untouched."


def _write_samples(config, ema_model, sde, device, run, writer, step, dataset) -> None:
    from sde import images

    was_training = ema_model.training
    ema_model.eval()
    with torch.no_grad():
        x = sample_grid(config, ema_model, sde, device).float().cpu()
    ema_model.train(was_training)
    path = run.samples / f"train_step_{step}.png"
    if not data.get_dataset(config.data.dataset).is_image:
        images.points_png(x.numpy(), path, title=f"step {step}",
                          reference=dataset[:2000].numpy())
        return
    grid = images.image_grid(data.float_to_uint8(x, dequantized=config.data.dequantize).numpy())
    images.save_png(grid, path)
    if writer is not None:
        writer.add_image("samples", grid, step, dataformats="HWC")
