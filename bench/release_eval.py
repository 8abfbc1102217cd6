"""Released-model quality: the ``--mode eval`` reports of the shipped weights as a results file.

    python main.py --config configs/mnist_vp_release.py --mode eval \
        --config.sampling.checkpoint=release/mnist_vp_release.safetensors --workdir runs/release
    python main.py --config configs/mnist_vp_release_lw.py --mode eval \
        --config.sampling.checkpoint=release/mnist_vp_release_lw.safetensors --workdir runs/release_lw
    python -m bench.release_eval runs/release/eval/report_step6000.json \
        --finetune runs/release_lw/eval/report_step1000.json

``--mode eval`` (sde/modes/evaluate.py) measures held-out loss and bits/dim (probability-flow
ODE and ELBO) on ``eval.bpd_num_images`` train5k images, and FID / KID and the MNIST
classifier's metrics of ``eval.num_samples`` samples of the config's sampler; it writes its
report to ``<workdir>/eval/report_step<step>.json``. This script turns the reports of the
release and of its likelihood fine-tune into ``bench/results/release_eval.json``, with the
``main.py`` commands above as their commands and this machine and today as their machine and
date (run it where and when the evals ran).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from bench.common import add_write_options, format_reading, machine, model_text, provenance, repo_relative, table

NAME, TITLE = "release_eval", "Released model quality"
#: The commands that produce the reports, by the config they evaluate.
EVAL_COMMANDS = {
    "release": ("python main.py --config configs/mnist_vp_release.py --mode eval "
                "--config.sampling.checkpoint=release/mnist_vp_release.safetensors --workdir runs/release"),
    "finetune": ("python main.py --config configs/mnist_vp_release_lw.py --mode eval "
                 "--config.sampling.checkpoint=release/mnist_vp_release_lw.safetensors --workdir runs/release_lw"),
}


def from_report(report: dict) -> dict:
    """The results-file fields of an eval report (report_step<step>.json)."""
    samples = report["samples"]
    classifier = samples.get("classifier", {})
    return {"model": {"checkpoint": repo_relative(report["checkpoint"]), "step": report["checkpoint_step"]},
            "heldout": {**report["heldout"], "loss": report["heldout_loss"]},
            "bpd_ode": report["bpd_ode"], "bpd_elbo": report["bpd_elbo"],
            "samples": {"sampler": samples["sampler"], "steps": samples["steps"], "nfe": samples["nfe"],
                        "num_samples": samples["num_samples"], "reference_images": samples["num_reference"],
                        "fid": samples["fid"], "kid": samples["kid"], "kid_std": samples["kid_std"],
                        "confidence": classifier.get("mean_confidence"),
                        "histogram_tv": classifier.get("histogram_tv_from_uniform")}}


def _recorded(value: float, most: int = 4) -> str:
    """``value`` to ``most`` decimals, or fewer where it was recorded with fewer (1.367, not 1.3670)."""
    decimals = next(d for d in range(most + 1) if d == most or round(value, d) == value)
    return f"{value:.{max(decimals, 2)}f}"


def _cells(part: dict) -> list[str]:
    samples, ode, elbo = part.get("samples", {}), part.get("bpd_ode", {}), part.get("bpd_elbo", {})

    def number(value, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    dequantization = ode.get("dequantization", "uniform").replace("_", "-")
    if "truncation" in ode:
        dequantization += f", τ = {ode['truncation']:g}"
    return [model_text(part["model"]), number(samples.get("fid"), 2),
            "" if samples.get("kid") is None else f"{1e3 * samples['kid']:.2f} ± {1e3 * samples['kid_std']:.2f}",
            number(samples.get("confidence"), 3), number(samples.get("histogram_tv"), 3),
            number(part.get("heldout", {}).get("loss"), 5),
            f"{_recorded(ode['mean'])} ± {_recorded(ode['standard_error'])} ({dequantization})" if ode else "",
            f"{_recorded(elbo['mean'])} ± {_recorded(elbo['standard_error'])}" if elbo else ""]


def render(result: dict) -> str:
    parts_ = [result] + result.get("supplements", [])
    samples = result["samples"]
    heldout = result["heldout"]
    body = [f"Samples: `{samples['sampler']}`, {samples['steps']} steps ({samples['nfe']} NFE), "
            f"{samples['num_samples']:,} of them against the Inception statistics of "
            f"{samples['reference_images']:,} training images; held out: {heldout['num_images']} "
            f"{heldout['split']} images (loss, bits/dim by the probability-flow ODE and by the ELBO).", "",
            table(["weights", "FID", "KID x1e3", "classifier confidence", "class histogram TV", "held-out loss",
                   "bits/dim, ODE", "bits/dim, ELBO"], [_cells(part) for part in parts_])]
    for part in parts_[1:]:
        body += ["", f"**{part['title']}.** {provenance(part)}"]
        if part.get("note"):
            body += ["", part["note"]]
    if result.get("image"):
        body += ["", f"![the first samples of the eval]({result['image']})"]
    lines = []
    for part in parts_[1:]:
        if part.get("samples", {}).get("fid") is not None:
            lines.append(f"{model_text(part['model'])}: FID {part['samples']['fid']:.2f} against the release's "
                         f"{samples['fid']:.2f}; ODE bits/dim {part['bpd_ode']['mean']:.3f} "
                         f"({part['bpd_ode']['dequantization'].replace('_', '-')} dequantization), ELBO "
                         f"{part['bpd_elbo']['mean']:.3f} against {result['bpd_elbo']['mean']:.3f}.")
    return "\n".join(body) + ("\n\n" + format_reading(lines) if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="the release's eval report (<workdir>/eval/report_step<step>.json)")
    parser.add_argument("--finetune", default="", help="the likelihood fine-tune's eval report")
    add_write_options(parser)
    args = parser.parse_args()
    today = datetime.date.today().isoformat()
    result = {"name": NAME, "title": TITLE, "command": EVAL_COMMANDS["release"], "machine": machine(),
              "date": today, **from_report(json.loads(Path(args.report).read_text())),
              "image": "release/samples_ancestral100.png"}
    if args.finetune:
        result["supplements"] = [{"title": "Likelihood fine-tune", "command": EVAL_COMMANDS["finetune"],
                                  "machine": machine(), "date": today,
                                  **from_report(json.loads(Path(args.finetune).read_text()))}]
    print(provenance(result) + "\n\n" + render(result))
    if not args.no_write:
        path = Path(args.results_dir) / f"{NAME}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"\nwrote {repo_relative(path)}")


if __name__ == "__main__":
    main()
