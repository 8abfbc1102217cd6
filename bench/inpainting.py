"""Inpainting of held-out MNIST digits with the unconditional release: how often the completed
digit keeps its class, per mask and method, against NFE.

    python -m bench.inpainting
    python -m bench.inpainting --images 8 --masks box --replacement-steps 10 --smc 4:10 --no-write  # quick

``--images`` digits of ``--split`` (the fixed evaluation subset) are observed through each of
``--masks`` (box: the centre quarter hidden; half: the right half hidden; random: a fraction
``--keep`` of the pixels observed, the same mask for every image) and completed by
replacement (Song et al. 2021) at each of ``--replacement-steps`` and by SMC (SMCDiff) at each
``particles:steps`` of ``--smc`` (``sde.inverse``; NFE per image = steps, resp. particles x
steps). For each: the fraction of completions that the toolkit's MNIST classifier assigns the
original's class (its accuracy on the originals is the ceiling), the mean confidence, and
the wall time. Writes ``bench/results/inpainting.json``.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import add_run_options, apply_threads, format_reading, load_config, model_text, table, write_result
from evaluation import load_classifier
from evaluation.classifier import images_to_input
from sde import data, inverse
from sde.inference import load_ema_model
from sde.sdes import create_sde

NAME = "inpainting"
TITLE = "Inpainting with the unconditional network (class kept, by mask and method)"


def classify(classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, confidence) of images on the [-1, 1] scale."""
    uint8 = data.float_to_uint8(x.float().cpu().clamp(-1, 1), dequantized=False)
    with torch.no_grad():
        probabilities = torch.softmax(classifier(images_to_input(uint8)), dim=1)
    return probabilities.argmax(1), probabilities.max(1).values


def method_runs(replacement_steps: list[int], smc: list[str]) -> list[tuple[str, dict]]:
    """(method, options) of replacement at each step count and SMC at each ``particles:steps``."""
    runs = [("replacement", {"steps": steps}) for steps in replacement_steps]
    return runs + [("smc", {"particles": int(pk.split(":")[0]), "steps": int(pk.split(":")[1])}) for pk in smc]


def setting(row: dict) -> str:
    """A row's method setting in words: its steps, and particles for SMC."""
    return f"{row['steps']} steps" + (f", {row['particles']} particles" if row["method"] == "smc" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors")
    parser.add_argument("--split", default="train5k")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--masks", nargs="+", default=["box", "half", "random"])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--replacement-steps", type=int, nargs="*", default=[20, 50, 100])
    parser.add_argument("--smc", nargs="*", default=["4:25", "8:25"], help="particles:steps")
    parser.add_argument("--seed", type=int, default=0)
    add_run_options(parser)
    args = parser.parse_args()
    apply_threads(args)
    config = load_config(args.config)
    model, _, step = load_ema_model(config, "", torch.device("cpu"), args.checkpoint)
    sde = create_sde(config)
    classifier = load_classifier()
    raw, labels = data.load_dataset(config, split=args.split)
    chosen, chosen_labels = data.evaluation_subset(raw, labels, args.images, seed=config.seed)
    x = data.uint8_to_float(chosen, dequantize=False).to(torch.float64)
    ceiling = float((classify(classifier, x)[0] == chosen_labels).double().mean())
    shape = tuple(x.shape[1:])
    masks = {"box": inverse.box_mask(shape, 7, 7, 14, 14), "half": inverse.half_mask(shape),
             "random": inverse.random_mask(shape, args.keep, torch.Generator().manual_seed(args.seed))}
    runs = method_runs(args.replacement_steps, args.smc)
    rows = []
    for mask_name in args.masks:
        projector = inverse.Mask(masks[mask_name])
        for method, options in runs:
            started = time.perf_counter()
            completed, info = inverse.solve(method, model, sde, projector.observe(x), projector,
                                            generator=torch.Generator().manual_seed(args.seed), **options)
            predicted, confidence = classify(classifier, completed)
            rows.append({"mask": mask_name, "method": method, **options, "nfe": info["nfe"],
                         "accuracy": float((predicted == chosen_labels).double().mean()),
                         "confidence": float(confidence.mean()), "seconds": round(time.perf_counter() - started, 1)})
            print(f"{mask_name} {method} {options}: class kept {rows[-1]['accuracy']:.2f}, NFE {info['nfe']}, "
                  f"{rows[-1]['seconds']} s", flush=True)
    result = {"model": {"checkpoint": args.checkpoint, "step": step}, "split": args.split, "images": len(x),
              "keep": args.keep, "classifier_on_originals": ceiling, "rows": rows}
    write_result(args, NAME, TITLE, result, render)


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [f"Model {model_text(result['model'])}; {result['images']} digits of {result['split']}; masks: box (the "
             f"centre 14 x 14 hidden), half (the right half hidden), random ({result['keep']:.0%} of the pixels "
             f"observed). Class kept: the fraction of completions the MNIST classifier assigns the original's class "
             f"(on the originals themselves: {result['classifier_on_originals']:.2f}).", ""]

    lines.append(table(["mask", "method", "setting", "NFE per image", "class kept", "confidence", "s"],
                       [[row["mask"], row["method"], setting(row), row["nfe"], f"{row['accuracy']:.2f}",
                         f"{row['confidence']:.2f}", row["seconds"]] for row in rows]))
    reading = []
    for mask in dict.fromkeys(row["mask"] for row in rows):
        mine = [row for row in rows if row["mask"] == mask]
        best = {method: max((row for row in mine if row["method"] == method), key=lambda row: row["accuracy"],
                            default=None) for method in ("replacement", "smc")}
        parts = [f"{method} {row['accuracy']:.2f} ({setting(row)}, {row['nfe']} NFE)"
                 for method, row in best.items() if row is not None]
        reading.append(f"{mask}: best class kept " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n\n" + format_reading(reading)


if __name__ == "__main__":
    main()
