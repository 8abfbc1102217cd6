"""Where a model's bits/dim go: its ELBO split by noise level and by pixel class.

    python bench/elbo_by_noise_level.py                      # the likelihood fine-tune, train5k
    python bench/elbo_by_noise_level.py --config configs/mnist_vp_release.py \
        --checkpoint release/mnist_vp_release.safetensors

The continuous-time bound of sde/likelihood.py (Kingma et al. 2021, eq. 17 in eps and
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
integrand is what the network does not yet know about the images. Appends the table to
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_run_options, apply_threads, load_config, publish  # noqa: E402
from sde import data, likelihood  # noqa: E402
from sde.inference import load_ema_model  # noqa: E402
from sde.sdes import broadcast_to, create_sde  # noqa: E402

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

    def cells(parts: torch.Tensor) -> list[str]:
        """'mean ± se (per pixel)' per class and the total, in bits/dim; parts [B, classes] nats."""
        bits = parts * to_bits
        out = []
        for c in range(bits.shape[1]):
            mean, error, _ = likelihood.mean_and_standard_error(bits[:, c, None])
            out.append(f"{mean:.4f} ± {error:.4f} ({mean / share[c].item():.3f})")
        mean, error, _ = likelihood.mean_and_standard_error(bits.sum(1, keepdim=True))
        return out + [f"{mean:.4f} ± {error:.4f}"]

    lines = [f"{source} (step {step}); {len(images)} {args.split} images (subset seed {args.seed}), "
             f"uniformly dequantized; {args.draws} stratified draws of lambda per band and image. "
             f"Pixel shares: " + ", ".join(f"{name} {share[c].item():.3f}" for c, name in enumerate(names))
             + ". Cells: bits/dim of the whole image ± standard error over images (bits per pixel of "
             "the class).", "",
             "| part | lambda | sigma | " + " | ".join(names) + " | all pixels |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    sigmas = sde.sigma(sde.t_from_log_snr(edges))
    for band in range(len(edges) - 1):
        lines.append(f"| diffusion | {edges[band]:.2f} to {edges[band + 1]:.2f} | "
                     f"{sigmas[band]:.3g} to {sigmas[band + 1]:.3g} | " + " | ".join(cells(diffusion[band])) + " |")
    lines.append("| prior | | | " + " | ".join(cells(prior)) + " |")
    lines.append("| reconstruction (with the Jacobian) | | | " + " | ".join(cells(reconstruction)) + " |")
    lines.append("| **ELBO** | | | " + " | ".join(cells(diffusion.sum(0) + prior + reconstruction)) + " |")
    lines += ["", f"Check: `likelihood.elbo_bits_per_dim` on the same images ({args.draws * (len(edges) - 1)} "
              f"draws per image, its own proposal): {check:.4f} ± {check_error:.4f} bits/dim. "
              f"{seconds:.0f} s."]
    body = "\n".join(lines)
    publish(args, "ELBO by noise level and pixel class", body)


if __name__ == "__main__":
    main()
