"""Where a model's bits/dim go: its ELBO split by noise level and by pixel class.

    python -m bench.investigations.elbo_by_noise_level       # the likelihood fine-tune, train5k
    python -m bench.investigations.elbo_by_noise_level --config configs/mnist_vp_release.py \
        --checkpoint release/mnist_vp_release.safetensors

The continuous-time bound of sde/likelihood (Kingma et al. 2021, eq. 17 in eps and
log-SNR form) on dequantized pixels x is prior + reconstruction + diffusion, where

    diffusion = int_{lambda(T)}^{lambda(eps)} E_z ||z - eps_theta(alpha x + sigma z, t)||^2 d lambda,

lambda = log(alpha / sigma). The squared norm is a sum over pixels, and the prior and
reconstruction terms are sums over pixels too (the reconstruction, with the Jacobian of the
dequantized scaling, is the same constant for every pixel). So the bound splits exactly into
a part per pixel class (background u = 0, ink u > 0) and, for the diffusion term, per band of
lambda. Each band is estimated from ``--draws`` stratified uniform draws of lambda per image
(one noise z per draw, the same draws for both classes); the table gives every part in
bits/dim of the whole image, its standard error over images, and the bits per pixel of the
class (part / the class's share of the pixels). The total is the model's ELBO bits/dim,
printed beside ``likelihood.elbo_bits_per_dim`` on the same images as a check.

Reading it: dequantized pixels spread evenly over their bin, so once the noise is below a
pixel level (lambda > 4.85) even the exact eps leaves an integrand of almost 1 per pixel and
unit of lambda, which the -lambda(eps) per pixel of the reconstruction term cancels; more than 1
there is a network that pulls pixels toward a grid they are not on. Below that scale the
integrand is what the network does not yet know about the images. Writes
``bench/results/elbo_by_noise_level.json``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from bench.common import (add_run_options, apply_threads, footnotes, format_reading, load_config, model_text,
                          repo_relative, table, write_result)
from sde import data, likelihood
from sde.inference import load_ema_model
from sde.sdes import broadcast_to, create_sde

NAME, TITLE = "elbo_by_noise_level", "ELBO by noise level and pixel class"

#: Pixel classes of an 8-bit image: name -> mask of its uint8 pixels.
PIXEL_CLASSES = {"background (u = 0)": lambda pixels: pixels == 0,
                 "ink (u > 0)": lambda pixels: pixels > 0}
#: Interior band edges in lambda = log(alpha / sigma); the outer edges are lambda(T) and
#: lambda(eps). 4 to 6 resolves the last levels before the noise falls under a pixel level
#: (sigma = 2/255 at lambda = 4.85).
DEFAULT_EDGES = (-2.0, 0.0, 2.0, 4.0, 5.0, 6.0)


def band_integrals(model, sde, x: torch.Tensor, masks: torch.Tensor, edges: torch.Tensor,
                   draws: int, generator: torch.Generator) -> torch.Tensor:
    """[bands, B, classes] estimates of int_band sum_{pixels of the class} ||z - eps||^2 dlambda
    in nats, from ``draws`` stratified uniform lambdas per band and image; ``masks`` [B,
    classes, *x.shape[1:]] marks each image's pixels of each class."""
    batch = x.shape[0]
    flat_masks = masks.flatten(2).double()  # [B, classes, D]
    result = torch.zeros(len(edges) - 1, batch, masks.shape[1], dtype=torch.float64)
    for band, (low, high) in enumerate(zip(edges[:-1].tolist(), edges[1:].tolist())):
        offsets = torch.rand(batch, draws, generator=generator, dtype=torch.float64)
        for k in range(draws):
            log_snr = low + (k + offsets[:, k]) / draws * (high - low)
            t = sde.t_from_log_snr(log_snr)
            alpha, sigma = broadcast_to(sde.alpha(t), x), broadcast_to(sde.sigma(t), x)
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            with torch.no_grad():
                eps = model((alpha * x + sigma * noise).float(), t.float()).double()
            squared = (noise - eps).pow(2).flatten(1)  # [B, D]
            result[band] += torch.einsum("bd,bcd->bc", squared, flat_masks) * (high - low) / draws
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release_lw.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release_lw.safetensors",
                        help="exported .safetensors weights or a training checkpoint .pt")
    parser.add_argument("--split", default="train5k", help="images to evaluate (held-out: train5k)")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--edges", type=float, nargs="+", default=list(DEFAULT_EDGES),
                        help="interior band edges in lambda = log(alpha/sigma), increasing")
    parser.add_argument("--draws", type=int, default=8, help="stratified lambda draws per band and image")
    parser.add_argument("--seed", type=int, default=0, help="image subset and noise seed")
    add_run_options(parser)
    args = parser.parse_args()
    if args.num_images < 2 or args.draws < 1:
        parser.error("--num-images must be >= 2 (standard errors) and --draws >= 1")
    apply_threads(args)
    config = load_config(args.config)
    if config.data.dataset not in ("mnist", "cifar10"):
        parser.error(f"--config {args.config}: pixel classes need 8-bit images, got data.dataset="
                     f"{config.data.dataset!r}")
    sde = create_sde(config)
    eps = likelihood.DEFAULT_EPS
    ends = sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64))
    edges = torch.tensor([ends[0].item(), *args.edges, ends[1].item()], dtype=torch.float64)
    if not bool((edges.diff() > 0).all()):
        parser.error(f"--edges must increase strictly inside (lambda(T), lambda(eps)) = "
                     f"({ends[0].item():.3f}, {ends[1].item():.3f}), got {args.edges}")
    model, source, step = load_ema_model(config, "", torch.device("cpu"), args.checkpoint)
    images, _ = data.evaluation_subset(*data.load_dataset(config, split=args.split), args.num_images,
                                       seed=args.seed)

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    x = data.uint8_to_float(images, dequantize=True, generator=generator).double()
    masks = torch.stack([select(images) for select in PIXEL_CLASSES.values()], 1)  # [B, classes, C, H, W]
    counts = masks.flatten(2).sum(2).double()  # [B, classes]
    dims = images[0].numel()
    to_bits = 1.0 / (dims * math.log(2.0))
    diffusion = band_integrals(model, sde, x, masks, edges, args.draws, generator)
    alpha_T, sigma_T = sde.alpha(torch.tensor(sde.T)), sde.sigma(torch.tensor(sde.T))
    prior_per_pixel = likelihood.gaussian_kl_to_prior_per_dim(alpha_T * x, sigma_T, sde.prior_std)
    prior = torch.einsum("bd,bcd->bc", prior_per_pixel.flatten(1), masks.flatten(2).double())
    # the same for every pixel: the bound's term plus the Jacobian of the dequantized scaling
    reconstruction_per_pixel = (likelihood.continuous_reconstruction_per_dim(ends[1].item())
                                - math.log(likelihood.DEQUANTIZED_SLOPE))
    reconstruction = counts * reconstruction_per_pixel
    seconds = time.perf_counter() - start
    check, check_error, _ = likelihood.elbo_bits_per_dim(
        model, sde, images, continuous=True, generator=torch.Generator().manual_seed(args.seed),
        num_times=args.draws * (len(edges) - 1))

    share = counts.mean(0) / dims  # [classes]
    names = list(PIXEL_CLASSES)

    def cells(parts: torch.Tensor) -> dict:
        """Per class [mean, standard error, bits per pixel of the class] and the total [mean,
        standard error], in bits/dim; ``parts`` [B, classes] in nats."""
        bits = parts * to_bits
        classes = []
        for c in range(bits.shape[1]):
            mean, error, _ = likelihood.mean_and_standard_error(bits[:, c, None])
            classes.append([mean, error, mean / share[c].item()])
        mean, error, _ = likelihood.mean_and_standard_error(bits.sum(1, keepdim=True))
        return {"classes": classes, "all": [mean, error]}

    sigmas = sde.sigma(sde.t_from_log_snr(edges))
    result = {"model": {"checkpoint": repo_relative(source), "step": step, "config": repo_relative(args.config)},
              "split": args.split, "num_images": len(images), "seed": args.seed, "draws": args.draws,
              "classes": names, "shares": share.tolist(),
              "bands": [{"lambda": [edges[band].item(), edges[band + 1].item()],
                         "sigma": [sigmas[band].item(), sigmas[band + 1].item()], **cells(diffusion[band])}
                        for band in range(len(edges) - 1)],
              "prior": cells(prior), "reconstruction": cells(reconstruction),
              "elbo": cells(diffusion.sum(0) + prior + reconstruction),
              "check": {"bpd": check, "bpd_se": check_error, "draws": args.draws * (len(edges) - 1)},
              "seconds": seconds}
    write_result(args, NAME, TITLE, result, render)


def _row(label: str, band: dict | None, part: dict, others: list[dict]) -> list[str]:
    cells = [f"{mean:.4f} ± {error:.4f} ({per_pixel:.3f})" for mean, error, per_pixel in part["classes"]]
    where = ["", ""] if band is None else [f"{band['lambda'][0]:.2f} to {band['lambda'][1]:.2f}",
                                           f"{band['sigma'][0]:.3g} to {band['sigma'][1]:.3g}"]
    compared = [" / ".join(f"{cell[0]:.4f}" for cell in other["classes"]) + f" / {other['all'][0]:.4f}"
                for other in others]
    return [label] + where + cells + [f"{part['all'][0]:.4f} ± {part['all'][1]:.4f}"] + compared


def _table(result: dict, others: list[tuple[dict, str]]) -> str:
    """The result's parts by band and class, with the means of ``others`` (same bands) beside them."""
    rows = [_row("diffusion", band, band, [other["bands"][index] for other, _ in others])
            for index, band in enumerate(result["bands"])]
    for label, key in (("prior", "prior"), ("reconstruction (with the Jacobian)", "reconstruction"),
                       ("**ELBO**", "elbo")):
        rows.append(_row(label, None, result[key], [other[key] for other, _ in others]))
    classes = " / ".join(name.split(" (")[0] for name in result["classes"])
    return table(["part", "λ", "σ"] + result["classes"] + ["all pixels"]
                 + [f"{model_text(other['model'])}{marker}: {classes} / all" for other, marker in others], rows)


def _describe(result: dict) -> str:
    shares = ", ".join(f"{name} {share:.3f}" for name, share in zip(result["classes"], result["shares"]))
    return (f"{model_text(result['model'])}; {result['num_images']} {result['split']} images, uniformly "
            f"dequantized; {result['draws']} stratified draws of λ per band and image. Pixel shares: {shares}. "
            f"Check: `likelihood.elbo_bits_per_dim` on the same images gives {result['check']['bpd']:.4f} ± "
            f"{result['check']['bpd_se']:.4f} against the table's {result['elbo']['all'][0]:.4f}")


def _where_the_bits_go(result: dict, marker: str = "") -> str:
    """The ELBO of the ink and of the background, and the ink's share between lambda 0 and 5."""
    ink = result["classes"].index("ink (u > 0)")
    background = 1 - ink
    total = result["elbo"]["all"][0]
    middle_bands = [band for band in result["bands"]
                    if band["lambda"][0] >= 0.0 - 1e-9 and band["lambda"][1] <= 5.0 + 1e-9]
    middle = sum(band["classes"][ink][0] for band in middle_bands)
    low_noise = sum(band["classes"][background][0] for band in result["bands"] if band["lambda"][0] >= 5.0 - 1e-9)
    levels = (f" (noise from {middle_bands[0]['sigma'][0] * 127.5:.2g} to {middle_bands[-1]['sigma'][1] * 127.5:.2g} "
              "pixel levels)" if middle_bands else "")
    return (f"{model_text(result['model'])}{marker}: the ink ({100 * result['shares'][ink]:.0f} % of the pixels) "
            f"costs {result['elbo']['classes'][ink][0]:.2f} of the {total:.2f} bits/dim, {middle:.2f} of it at λ "
            f"from 0 to 5{levels}, where the network must know where a digit's strokes run; the background "
            f"costs {result['elbo']['classes'][background][0]:.2f}: {low_noise:.2f} at λ > 5, below a pixel level "
            f"of noise, where the uniform bound compares the network with points spread evenly over the bin, "
            f"less {-result['reconstruction']['classes'][background][0]:.2f} of the reconstruction term.")


def _changes(result: dict, other: dict) -> str:
    """Where the ELBO of ``result`` differs from ``other``'s (same images and draws), by band and class."""
    changes = []
    for band, before in zip(result["bands"], other["bands"]):
        for name, after_cell, before_cell in zip(result["classes"], band["classes"], before["classes"]):
            changes.append((after_cell[0] - before_cell[0], name, band["lambda"]))
    large = sorted((change for change in changes if abs(change[0]) >= 0.01), key=lambda change: change[0])
    listed = "; ".join(f"{name} at λ {round(low, 2):g} to {round(high, 2):g}: {difference:+.3f}"
                       for difference, name, (low, high) in large)
    return (f"{model_text(result['model'])} against {model_text(other['model'])}: ELBO "
            f"{result['elbo']['all'][0] - other['elbo']['all'][0]:+.4f} bits/dim"
            + (f"; the changes of 0.01 or more: {listed}." if listed else "."))


def _fourier(supplement: dict, marker: str) -> tuple[list[str], list[str]]:
    levels = supplement["log_snr"]

    def error(value: float) -> str:
        return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"

    parts = ["", f"**{supplement['title']}**{marker}. {supplement['note']}", "",
             table(["eps error per pixel, background / ink"] + [f"λ = {level:g}" for level in levels],
                   [[row["network"]] + [f"{error(bg)} / {error(ink)}" for bg, ink in zip(row["background"], row["ink"])]
                    for row in supplement["eps_errors"]]), "",
             table(["network", "ODE bits/dim, truncated-normal τ = 2", "NFE", "ELBO bits/dim (DDPM)"],
                   [[row["network"], f"{row['ode_bpd']:.4f} ± {row['ode_bpd_se']:.3f}", row["nfe"],
                     f"{row['elbo_bpd']:.3f} ± {row['elbo_bpd_se']:.3f}"] for row in supplement["bounds"]])]
    cases, worse = [], True
    for plain, featured in zip(supplement["bounds"][::2], supplement["bounds"][1::2]):
        worse = worse and featured["ode_bpd"] > plain["ode_bpd"] and featured["elbo_bpd"] > plain["elbo_bpd"]
        cases.append(f"{plain['network']}: ODE bits/dim {plain['ode_bpd']:.3f} → {featured['ode_bpd']:.3f} "
                     f"({plain['nfe']} → {featured['nfe']} NFE), ELBO {plain['elbo_bpd']:.3f} → "
                     f"{featured['elbo_bpd']:.3f}")
    line = f"Pixel Fourier features{marker}: " + "; ".join(cases)
    return parts, [line + (". Worse on both bounds every time (and the ODE stiffer), so not adopted." if worse else ".")]


def render(result: dict) -> str:
    supplements = result.get("supplements", [])
    markers, notes = footnotes([{key: value for key, value in part.items() if key != "note"} for part in supplements])
    compared = [(part, marker) for part, marker in zip(supplements, markers) if "bands" in part]
    parts = [_describe(result) + ". Cells: bits/dim of the whole image ± standard error over images (bits per "
             "pixel of the class)" + ("; beside them the means of the other model on the same images and draws"
                                      if compared else "") + ":", "", _table(result, compared)]
    lines = [_where_the_bits_go(result)]
    for part, marker in compared:
        lines.append(_where_the_bits_go(part, marker))
        lines.append(_changes(result, part))
    for part, marker in zip(supplements, markers):
        if "eps_errors" in part:
            more_parts, more_lines = _fourier(part, marker)
            parts += more_parts
            lines += more_lines
    parts += [""] + notes
    return "\n".join(parts) + "\n\n" + format_reading(lines)


if __name__ == "__main__":
    main()
