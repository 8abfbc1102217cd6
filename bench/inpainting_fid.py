"""FID of inpainted held-out MNIST digits against NFE, per method, beside the real digits' FID.

    python -m bench.inpainting_fid
    python -m bench.inpainting_fid --images 100 --replacement-steps 10 --smc --no-write  # quick

``--images`` digits of ``--split`` (the fixed evaluation subset; 1,000 by default, the FID
protocol's sample count) are observed through ``--mask`` (half: the right half hidden; box:
the centre 14 x 14 hidden) and completed by replacement (Song et al. 2021) at each of
``--replacement-steps`` and by SMC (SMCDiff) at each ``particles:steps`` of ``--smc``
(``sde.inverse``), in batches of ``--batch`` digits. Each set of completions is scored like
samples are: FID against the Inception statistics of the release's 10,000 training images
(cached once per machine), and the fraction the MNIST classifier assigns the original's
class. The floor is the same metrics for the original digits themselves: a completion method
can approach it, not pass it. Writes ``bench/results/inpainting_fid.json``.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import add_run_options, apply_threads, format_reading, load_config, model_text, table, write_result
from bench.inpainting import classify, method_runs, setting
from evaluation import FeatureSet, compare_feature_sets, load_classifier
from sde import data, inverse
from sde.inference import load_ema_model
from sde.quality import inception_for, reference_features
from sde.sdes import create_sde

NAME = "inpainting_fid"
TITLE = "Inpainting FID against NFE"
MASKS = ("half", "box")


def score(images: torch.Tensor, labels: torch.Tensor, inception, classifier, reference, batch: int) -> dict:
    """FID (against ``reference``) and class kept of images on the [-1, 1] scale."""
    features = FeatureSet.empty()
    uint8 = data.float_to_uint8(images.float().clamp(-1, 1), dequantized=False)
    for start in range(0, len(uint8), batch):
        features.update(inception(uint8[start:start + batch]))
    predicted, confidence = classify(classifier, images)
    return {"fid": compare_feature_sets(features, reference)["fid"],
            "accuracy": float((predicted == labels).double().mean()), "confidence": float(confidence.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors")
    parser.add_argument("--split", default="train5k")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--mask", choices=MASKS, default="half")
    parser.add_argument("--replacement-steps", type=int, nargs="*", default=[10, 20, 50, 100])
    parser.add_argument("--smc", nargs="*", default=["4:25"], help="particles:steps")
    parser.add_argument("--batch", type=int, default=100, help="digits completed per call")
    parser.add_argument("--seed", type=int, default=0)
    add_run_options(parser)
    args = parser.parse_args()
    apply_threads(args)
    config = load_config(args.config)
    device = torch.device("cpu")
    model, _, step = load_ema_model(config, "", device, args.checkpoint)
    sde = create_sde(config)
    classifier, inception = load_classifier(), inception_for(config, device)
    reference = reference_features(config, inception)
    raw, labels = data.load_dataset(config, split=args.split)
    chosen, chosen_labels = data.evaluation_subset(raw, labels, args.images, seed=config.seed)
    x = data.uint8_to_float(chosen, dequantize=False).to(torch.float64)
    shape = tuple(x.shape[1:])
    mask = inverse.half_mask(shape) if args.mask == "half" else inverse.box_mask(shape, 7, 7, 14, 14)
    projector = inverse.Mask(mask)
    floor = score(x, chosen_labels, inception, classifier, reference, config.eval.batch_size)
    print(f"originals: FID {floor['fid']:.2f}, class {floor['accuracy']:.3f}", flush=True)
    rows = []
    for method, options in method_runs(args.replacement_steps, args.smc):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed)
        parts, nfe = [], 0
        for start in range(0, len(x), args.batch):
            chunk = x[start:start + args.batch]
            completed, info = inverse.solve(method, model, sde, projector.observe(chunk), projector,
                                            generator=generator, **options)
            parts.append(completed)
            nfe = info["nfe"]
        sampling = time.perf_counter() - started
        metrics = score(torch.cat(parts), chosen_labels, inception, classifier, reference, config.eval.batch_size)
        rows.append({"method": method, **options, "nfe": nfe, **metrics, "seconds": round(sampling, 1)})
        print(f"{method} {options}: FID {metrics['fid']:.2f}, class {metrics['accuracy']:.3f}, NFE {nfe}, "
              f"{sampling:.0f} s", flush=True)
    result = {"model": {"checkpoint": args.checkpoint, "step": step}, "split": args.split, "images": len(x),
              "mask": args.mask, "reference_images": reference.count, "floor": floor, "rows": rows}
    write_result(args, NAME, TITLE, result, render)


def render(result: dict) -> str:
    rows, floor = result["rows"], result["floor"]
    hidden = "the right half" if result["mask"] == "half" else "the centre 14 x 14"
    lines = [f"Model {model_text(result['model'])}; {result['images']:,} digits of {result['split']} with "
             f"{hidden} hidden, completed once each. FID against the {result['reference_images']:,} training "
             f"images' statistics; class kept as in the section above. The originals themselves score FID "
             f"{floor['fid']:.2f} and class {floor['accuracy']:.3f}: the floor. Seconds: the completions' wall "
             f"time (Inception excluded).", ""]

    lines.append(table(["method", "setting", "NFE per image", "FID", "class kept", "confidence", "s"],
                       [[row["method"], setting(row), row["nfe"], f"{row['fid']:.2f}", f"{row['accuracy']:.3f}",
                         f"{row['confidence']:.2f}", row["seconds"]] for row in rows]))
    reading = []
    replacement = sorted((row for row in rows if row["method"] == "replacement"), key=lambda row: row["nfe"])
    if len(replacement) > 1:
        reading.append("Replacement: FID " + " → ".join(f"{row['fid']:.2f}" for row in replacement) + " at "
                       + " / ".join(str(row["nfe"]) for row in replacement) + " NFE.")
    for row in (row for row in rows if row["method"] == "smc"):
        same = [other for other in replacement if other["nfe"] == row["nfe"]]
        versus = f" (replacement at the same NFE: {same[0]['fid']:.2f})" if same else ""
        reading.append(f"SMC with {row['particles']} particles x {row['steps']} steps: FID {row['fid']:.2f}"
                       f"{versus}, class kept {row['accuracy']:.3f}.")
    best = min(rows, key=lambda row: row["fid"]) if rows else None
    if best is not None:
        reading.append(f"Best: {best['method']} ({setting(best)}), {best['fid'] / floor['fid']:.2f}x the "
                       "originals' FID.")
    return "\n".join(lines) + "\n\n" + format_reading(reading)


if __name__ == "__main__":
    main()
