"""``--mode eval``: held-out loss, bits/dim (ODE and ELBO), FID/KID and classifier metrics;
for point data the held-out loss, the ODE log-likelihood against the true density and the
sliced Wasserstein distance of samples to the data law (``point_metrics``).

For the latest checkpoint (or ``sampling.checkpoint``) it writes
``workdir/eval/report_step<step>.json`` (``report_exact.json`` for the closed-form toy
model), TensorBoard scalars under ``eval/`` and prints a table. FID/KID use
``eval.num_samples`` images from the configured sampler against the Inception statistics of
the training split (cached once per machine, ``sde.quality.cache_dir``); bits/dim use
``eval.bpd_num_images`` images of ``eval.heldout_split``. A class-conditional model draws
the classes of ``sampling.labels`` with ``sampling.guidance``, and the report adds the
classifier's accuracy against them (per class, confusion matrix) and the bits/dim of each
held-out image given its class beside the unconditional figure.

Under ``torchrun`` every rank samples, extracts features of and scores its share of the
batches (batch b on rank b mod world); sums of statistics and per-image values are combined
with tensor collectives (`sde.distributed`), so the report does not depend on the number of
processes: held-out loss, bits/dim, KID and classifier histogram bit for bit, FID and
classifier averages up to the order of float64 additions. Only rank 0 writes and prints.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.points import sliced_wasserstein
from sde import conditioning, configuration, data, distributed, environment, images, likelihood
from sde.checks import require
from sde.configuration import sampler_options
from sde.generation import generate
from sde.inference import load_ema_model
from sde.losses import LossConfig, make_loss_fn
from sde.models import is_exact
from sde.progress import bar as progress_bar
from sde.quality import check_cache_dir, classifier_metrics_for, inception_for, reference_features, sample_quality
from sde.sdes import create_sde
from sde.workdir import Workdir

#: Random streams of the held-out evaluation: batch b of stream s draws from generator
#: (config.seed, s, b), whichever process evaluates it.
HELDOUT_LOSS_STREAM, BPD_ODE_STREAM, BPD_ELBO_STREAM, ELBO_PILOT_STREAM, SLICED_WASSERSTEIN_STREAM = range(5)
#: The ELBO parts reported besides the total (likelihood.elbo_bits_per_dim).
ELBO_PARTS = ("prior", "diffusion", "reconstruction")


def _batch_generator(seed: int, stream: int, batch_index: int) -> torch.Generator:
    """The CPU generator of one held-out batch of one random stream (SeedSequence-mixed)."""
    words = np.random.SeedSequence([seed, stream, batch_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def _elbo_proposal(config, model, sde, heldout: torch.Tensor, device: torch.device):
    """The ELBO's importance proposal, fitted by every rank on the same pilot images with the
    same generator (so all ranks use one proposal); returns (proposal, its NFE)."""
    pilot = heldout[:likelihood.PILOT_IMAGES].to(device)
    _, _, info = likelihood.elbo_bits_per_dim(
        model, sde, pilot, continuous=config.training.continuous, batch_size=len(pilot),
        generator=_batch_generator(config.seed, ELBO_PILOT_STREAM, 0))
    return info["proposal"], info["nfe"]


def _per_image(bits: torch.Tensor) -> list[float]:
    """Each held-out image's bits/dim (mean over its repeats), in the held-out subset's order:
    two evaluations of the same subset and seed (two networks, two settings) compare image by
    image, a paired difference with a far smaller error than that of two means."""
    return [round(value, 6) for value in bits.mean(1).tolist()]


def heldout_metrics(config, model, sde, heldout: torch.Tensor, *, shard: tuple[int, int] = (0, 1),
                    labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Held-out loss (the training objective, plain weighting) and bits/dim by the
    probability-flow ODE and the ELBO of uint8 images, in batches of ``eval.batch_size``.
    With ``labels`` (a class-conditional model) also the ODE's bits/dim of each image given
    its class, -log2 p(x | y) / D, beside the unconditional figure (the null label), with
    the same dequantization noise and probes. The loss and the ELBO are the null label's
    (unconditional) figures.

    Batch b draws its noise from `_batch_generator` (config.seed, stream, b) and is
    evaluated on rank b mod world; per-image bits/dim and per-batch loss sums are assembled
    on every rank (`distributed.sum_over_ranks`, exact), so means and standard errors are
    those of one process, bit for bit.
    """
    eval_cfg, device = config.eval, next(model.parameters()).device
    loss_fn = make_loss_fn(sde, LossConfig(continuous=config.training.continuous,
                                           eps=config.training.eps))
    count, repeats, batch_size = len(heldout), eval_cfg.bpd_repeats, eval_cfg.batch_size
    num_batches = math.ceil(count / batch_size)
    loss_sums = torch.zeros(num_batches, dtype=torch.float64)
    ode_bits = torch.zeros(count, repeats, dtype=torch.float64)
    conditional_bits = torch.zeros(count, repeats, dtype=torch.float64)
    elbo_bits = torch.zeros(count, repeats, dtype=torch.float64)
    elbo_part_sums = torch.zeros(num_batches, len(ELBO_PARTS), dtype=torch.float64)
    proposal, pilot_nfe = _elbo_proposal(config, model, sde, heldout, device)
    nfe = torch.tensor([0, pilot_nfe if shard[0] == 0 else 0, 0], dtype=torch.int64)  # (ODE, ELBO, ODE | y)
    started = time.perf_counter()
    mine = range(shard[0], num_batches, shard[1])
    bar = progress_bar(desc=f"held-out bits/dim (ODE, ELBO) of {count} images", unit="img",
                       total=sum(min(count, (b + 1) * batch_size) - b * batch_size for b in mine),
                       disable=shard[0] != 0)
    for batch_index in mine:
        rows = slice(batch_index * batch_size, min(count, (batch_index + 1) * batch_size))
        batch = heldout[rows]
        generator = _batch_generator(config.seed, HELDOUT_LOSS_STREAM, batch_index)
        with torch.no_grad():
            x0 = data.uint8_to_float(batch, dequantize=config.data.dequantize,
                                     generator=generator).to(device)
            loss_sums[batch_index] = loss_fn(model, x0, generator=generator).item() * len(batch)
        _, _, info = likelihood.bits_per_dim(
            model, sde, batch.to(device), repeats=repeats, batch_size=len(batch),
            generator=_batch_generator(config.seed, BPD_ODE_STREAM, batch_index),
            dequantization=eval_cfg.bpd_dequantization, truncation=eval_cfg.bpd_truncation,
            dequantized_grid=config.data.dequantize)
        ode_bits[rows], nfe[0] = info["per_image"], nfe[0] + info["nfe"]
        if labels is not None:
            _, _, info = likelihood.bits_per_dim(
                model, sde, batch.to(device), repeats=repeats, batch_size=len(batch), labels=labels[rows],
                generator=_batch_generator(config.seed, BPD_ODE_STREAM, batch_index),
                dequantization=eval_cfg.bpd_dequantization, truncation=eval_cfg.bpd_truncation,
                dequantized_grid=config.data.dequantize)
            conditional_bits[rows], nfe[2] = info["per_image"], nfe[2] + info["nfe"]
        _, _, info = likelihood.elbo_bits_per_dim(
            model, sde, batch.to(device), continuous=config.training.continuous, repeats=repeats,
            batch_size=len(batch), proposal=proposal,
            generator=_batch_generator(config.seed, BPD_ELBO_STREAM, batch_index))
        elbo_bits[rows], nfe[1] = info["per_image"], nfe[1] + info["nfe"]
        elbo_part_sums[batch_index] = torch.tensor([info[part] for part in ELBO_PARTS]) * len(batch) * repeats
        bar.set_postfix(ode_nfe=int(nfe[0]), elbo_nfe=int(nfe[1]), refresh=False)
        bar.update(len(batch))
    bar.close()
    loss_sums, ode_bits, elbo_bits, elbo_part_sums, nfe, conditional_bits = (
        distributed.sum_over_ranks(tensor)
        for tensor in (loss_sums, ode_bits, elbo_bits, elbo_part_sums, nfe, conditional_bits))
    report: dict[str, Any] = {"heldout_loss": loss_sums.sum().item() / count}
    mean, standard_error, _ = likelihood.mean_and_standard_error(ode_bits)
    report["bpd_ode"] = {"mean": mean, "standard_error": standard_error, "nfe": int(nfe[0]),
                         "dequantization": eval_cfg.bpd_dequantization, "per_image": _per_image(ode_bits)}
    if eval_cfg.bpd_dequantization == "truncated_normal":
        report["bpd_ode"].update(truncation=eval_cfg.bpd_truncation, t0=likelihood.truncation_time(
            sde, eval_cfg.bpd_truncation, config.data.dequantize))
    if labels is not None:
        mean, standard_error, _ = likelihood.mean_and_standard_error(conditional_bits)
        difference, difference_error, _ = likelihood.mean_and_standard_error(ode_bits - conditional_bits)
        report["bpd_ode_given_class"] = {"mean": mean, "standard_error": standard_error, "nfe": int(nfe[2]),
                                         "gain_over_unconditional": difference,
                                         "gain_standard_error": difference_error}
    mean, standard_error, _ = likelihood.mean_and_standard_error(elbo_bits)
    parts = elbo_part_sums.sum(0) / (count * repeats)
    report["bpd_elbo"] = {"mean": mean, "standard_error": standard_error, "nfe": int(nfe[1]),
                          **{part: value.item() for part, value in zip(ELBO_PARTS, parts)},
                          "per_image": _per_image(elbo_bits)}
    if shard[0] == 0:
        print(f"held-out bits/dim of {count} images: ODE {report['bpd_ode']['mean']:.4f} "
              f"({int(nfe[0])} NFE), ELBO {mean:.4f} ({int(nfe[1])} NFE) in {time.perf_counter() - started:.0f} s",
              flush=True)
    return report


def point_metrics(config, model, sde, device: torch.device, *, progress: bool = True) -> dict[str, Any]:
    """Toy-data metrics: held-out loss; -log p(x) of ``eval.bpd_num_images`` held-out points by
    the probability-flow ODE (exact divergence, Song et al. 2021 eq. 39), beside the true
    density where the set has a closed form (with the exact score the two agree up to the
    prior mismatch at T and the ODE's tolerance); the sliced Wasserstein-2 distance between
    ``eval.num_samples`` samples of the configured sampler and as many fresh points of the
    data law (the "test" draw), with its floor, the distance between the "train" draw and the
    "test" draw of that size. Point data are small: every rank computes all of it.
    """
    eval_cfg, name = config.eval, config.data.toy_name
    closed_form = data.toy_mixture(name) if name in data.CLOSED_FORM_NAMES else None
    heldout, _ = data.evaluation_subset(*data.load_dataset(config, split=eval_cfg.heldout_split),
                                        eval_cfg.bpd_num_images, seed=config.seed)
    loss_fn = make_loss_fn(sde, LossConfig(continuous=config.training.continuous, eps=config.training.eps))
    loss_sum, nll, nfe = 0.0, [], 0
    started = time.perf_counter()
    for batch_index, start in enumerate(range(0, len(heldout), eval_cfg.batch_size)):
        batch = heldout[start:start + eval_cfg.batch_size].to(device)
        generator = _batch_generator(config.seed, HELDOUT_LOSS_STREAM, batch_index)
        with torch.no_grad():
            loss_sum += loss_fn(model, batch, generator=generator).item() * len(batch)
        logp, info = likelihood.ode_log_likelihood(model, sde, batch, divergence="exact")
        nll.append(-logp.cpu())
        nfe += info["nfe"]
    nll = torch.cat(nll)
    report: dict[str, Any] = {"heldout": {"split": eval_cfg.heldout_split, "num_images": len(heldout)},
                              "heldout_loss": loss_sum / len(heldout)}
    mean, standard_error, _ = likelihood.mean_and_standard_error(nll[:, None])
    report["nll_ode"] = {"mean": mean, "standard_error": standard_error, "nfe": nfe, "divergence": "exact"}
    if closed_form is not None:
        error = nll + closed_form.log_prob(heldout)
        report["nll_ode"].update(true_mean=float(-closed_form.log_prob(heldout).mean()),
                                 mean_abs_error=float(error.abs().mean()), max_abs_error=float(error.abs().max()))
    if progress:
        print(f"held-out -log p of {len(heldout)} points by the ODE: {mean:.4f} nats ({nfe} NFE) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)

    count, sampling = eval_cfg.num_samples, config.sampling
    produced = generate(config, model, sde, device, num_samples=count, seed=sampling.seed, method=sampling.method,
                        steps=sampling.steps, options=sampler_options(config), progress=progress)
    batches = [(x.float().cpu(), info["nfe"]) for _, x, info in produced]
    samples = torch.cat([x for x, _ in batches])
    law = data.load_toy(name, count, config.seed, "test")
    def distance(points: torch.Tensor) -> float:  # the same directions for both distances
        return sliced_wasserstein(points, law, generator=_batch_generator(config.seed, SLICED_WASSERSTEIN_STREAM, 0))

    report["samples"] = {
        "sampler": sampling.method, "steps": sampling.steps, "nfe": batches[-1][1], "num_samples": count,
        "sliced_wasserstein": distance(samples),
        "sliced_wasserstein_floor": distance(data.load_toy(name, count, config.seed, "train")),
        "mean": samples.double().mean(0).tolist(), "std": samples.double().std(0).tolist(),
        "data_mean": law.double().mean(0).tolist(), "data_std": law.double().std(0).tolist()}
    if closed_form is not None:
        weights, means = closed_form.weights[:, None], closed_form.means
        true_mean = (weights * means).sum(0)
        second = (weights * (torch.diagonal(closed_form.covariances, dim1=-2, dim2=-1) + means ** 2)).sum(0)
        report["samples"].update(data_mean=true_mean.tolist(), data_std=(second - true_mean ** 2).sqrt().tolist())
    return report


def check(config) -> None:
    """The config of an evaluation: one clear ValueError on the first problem."""
    configuration.validate(config)
    evaluation = config.eval
    require(evaluation.bpd_dequantization in likelihood.DEQUANTIZATIONS,
            f"unknown eval.bpd_dequantization {evaluation.bpd_dequantization!r}; "
            f"accepted: {', '.join(likelihood.DEQUANTIZATIONS)}")
    if evaluation.bpd_dequantization == "truncated_normal":
        try:
            likelihood.truncation_time(create_sde(config), evaluation.bpd_truncation, config.data.dequantize)
        except ValueError as error:
            raise ValueError(f"eval.bpd_truncation: {error}") from error
    try:
        data.validate_data_config(config, evaluation.heldout_split)
    except ValueError as error:
        raise ValueError(f"eval.heldout_split: {error}") from error
    configuration.check_sampling(config, evaluation.num_samples)  # eval draws eval.num_samples
    if data.get_dataset(config.data.dataset).is_image:
        check_cache_dir(config)


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode eval``: check the config, then evaluate (``evaluate``)."""
    check(config)
    return evaluate(config, workdir)


def evaluate(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode eval``; returns the report it writes (rank 0; ``{}`` on other ranks)."""
    context = distributed.setup(config.device, config.tf32)
    run = Workdir(workdir, create=context.is_main)
    device = context.device
    eval_cfg = config.eval
    sde = create_sde(config)
    model, source, step = load_ema_model(config, workdir, device, config.sampling.checkpoint)
    running_on = environment.announce(device, processes=context.world_size, model=model, show=context.is_main)
    report: dict[str, Any] = {"checkpoint": source, "checkpoint_step": step, "sde": repr(sde),
                              "environment": running_on}

    if data.get_dataset(config.data.dataset).is_image:
        heldout, heldout_labels = data.evaluation_subset(*data.load_dataset(config, split=eval_cfg.heldout_split),
                                                         eval_cfg.bpd_num_images, seed=config.seed)
        report["heldout"] = {"split": eval_cfg.heldout_split, "num_images": len(heldout)}
        conditional = conditioning.num_classes(model) > 0
        report.update(heldout_metrics(config, model, sde, heldout, shard=context.shard,
                                      labels=heldout_labels if conditional else None))

        inception = inception_for(config, device)
        reference = reference_features(config, inception, shard=context.shard)
        classifier = classifier_metrics_for(config, device)
        quality, grid = sample_quality(
            config, model, sde, device, method=config.sampling.method, steps=config.sampling.steps,
            options=sampler_options(config), num_samples=eval_cfg.num_samples,
            inception=inception, reference=reference, classifier=classifier,
            progress=context.is_main, shard=context.shard,
            labels=configuration.sampling_labels(config, eval_cfg.num_samples), guidance=config.sampling.guidance)
        report["samples"] = quality
        if context.is_main:
            images.save_png(images.image_grid(grid), run.eval / f"samples_step{step}.png")
    else:
        report.update(point_metrics(config, model, sde, device, progress=context.is_main))

    if not context.is_main:
        return {}
    tag = "exact" if is_exact(config) else f"step{step}"  # the closed-form model has no training step
    images.save_json(report, run.eval / f"report_{tag}.json")
    _log_tensorboard(run, report, step or 0)
    report["message"] = format_report(report)
    return report


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    scalars = {}
    if "heldout_loss" in report:
        scalars["heldout_loss"] = report["heldout_loss"]
    for key in ("bpd_ode", "bpd_ode_given_class", "bpd_elbo", "nll_ode"):
        if key in report:
            scalars[key] = report[key]["mean"]
    quality = report.get("samples", {})
    for key in ("fid", "kid", "sliced_wasserstein"):
        if key in quality:
            scalars[key] = quality[key]
    if "classifier" in quality:
        scalars["classifier_confidence"] = quality["classifier"]["mean_confidence"]
        scalars["class_histogram_tv"] = quality["classifier"]["histogram_tv_from_uniform"]
        if "accuracy" in quality["classifier"]:
            scalars["class_accuracy"] = quality["classifier"]["accuracy"]
    return scalars


def _log_tensorboard(run: Workdir, report: dict[str, Any], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run.tensorboard)) as writer:
        for name, value in _scalars(report).items():
            writer.add_scalar(f"eval/{name}", value, step)


def _numbers(values) -> str:
    return "(" + ", ".join(f"{value:.3f}" for value in values) + ")"


def format_report(report: dict[str, Any]) -> str:
    """A printed table of the report's headline numbers."""
    step = report["checkpoint_step"]
    rows = [("checkpoint", report["checkpoint"] + (f" (step {step})" if step is not None else ""))]
    points = "nll_ode" in report
    if "heldout_loss" in report:
        rows.append(("held-out loss", f"{report['heldout_loss']:.5f}  ({report['heldout']['num_images']} "
                                      f"{report['heldout']['split']} {'points' if points else 'images'})"))
    if points:
        nll = report["nll_ode"]
        value = f"{nll['mean']:.4f} ± {nll['standard_error']:.4f} nats  ({nll['nfe']} NFE)"
        if "true_mean" in nll:
            value += f"; true {nll['true_mean']:.4f}, mean |error| {nll['mean_abs_error']:.2e}"
        rows.append(("-log p (ODE)", value))
    for key, label in (("bpd_ode", "bits/dim (ODE)"), ("bpd_ode_given_class", "bits/dim given class (ODE)"),
                       ("bpd_elbo", "bits/dim (ELBO)")):
        if key in report:
            value = f"{report[key]['mean']:.4f} ± {report[key]['standard_error']:.4f}"
            if "dequantization" in report[key]:
                value += f"  ({report[key]['dequantization'].replace('_', '-')} dequantization)"
            rows.append((label, value))
    quality = report.get("samples")
    if quality and points:
        rows.append(("sampler", f"{quality['sampler']}, {quality['steps']} steps, {quality['nfe']} NFE"))
        rows.append(("sliced W2 to data", f"{quality['sliced_wasserstein']:.4f}  ({quality['num_samples']} samples; "
                                          f"two draws of the data: {quality['sliced_wasserstein_floor']:.4f})"))
        rows.append(("mean / std", f"{_numbers(quality['mean'])} / {_numbers(quality['std'])}  (data "
                                   f"{_numbers(quality['data_mean'])} / {_numbers(quality['data_std'])})"))
    elif quality:
        rows.append(("sampler", f"{quality['sampler']}, {quality['steps']} steps, {quality['nfe']} NFE"))
        rows.append(("FID", f"{quality['fid']:.3f}  ({quality['num_samples']} samples vs "
                            f"{quality['num_reference']} reference images)"))
        rows.append(("KID", f"{quality['kid']:.5f} ± {quality['kid_std']:.5f}"))
        if "classifier" in quality:
            c = quality["classifier"]
            rows.append(("classifier confidence", f"{c['mean_confidence']:.4f}"))
            rows.append(("class histogram", f"{c['class_histogram']} (TV from uniform "
                                            f"{c['histogram_tv_from_uniform']:.4f})"))
            if "accuracy" in c:
                rows.append(("class asked for, recognised", f"{c['accuracy']:.4f}  (guidance "
                                                             f"{quality['guidance']:g})"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
