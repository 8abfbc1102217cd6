"""FID's Inception-v3 on this machine: images/s by setting, what the adopted one does to FID,
and what `--mode eval` costs before and after its reference statistics are cached.

    python -m bench.inception_speed                 # about 15 minutes on 2 CPU cores

1. Throughput. The same MNIST images through ``evaluation.InceptionFeatures`` under each
   setting: the images per network call (the former default was ``eval.batch_size``, 100),
   the memory layout of the input (channels-last, which ``inception_input`` uses, against
   contiguous NCHW), a frozen and inference-optimised TorchScript graph, one thread against
   the machine's, and bf16 autocast. Settings alternate over ``--repeats`` rounds and each
   keeps its best round (the least disturbed by other work on a shared machine); every
   figure is from this one run, so read the ratios.
2. FID. ``--fid-samples`` samples of the released model (DPM-Solver++, 20 steps, seed 0)
   through the former and the adopted setting, each against the same reference statistics:
   the difference of the two FIDs and the largest difference of a feature. A setting is
   adopted only where the difference is below ``FID_TOLERANCE``.
3. Eval wall time. The README's small eval of the release, run twice as a user would
   (``main.py`` subprocesses) with an empty per-machine cache: the first run computes the
   reference statistics, the second, in another workdir, finds them cached.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import REPO, add_run_options, apply_threads, format_reading, table, write_result

NAME, TITLE = "inception_speed", "FID's Inception: images/s, and the cost of eval before and after caching"
FID_TOLERANCE = 0.05
FORMER_CHUNK = 100  # eval.batch_size, which InceptionFeatures was given before DEFAULT_CHUNK
RELEASE_CONFIG = "configs/mnist_vp_release.py"
RELEASE_WEIGHTS = "release/mnist_vp_release.safetensors"
SMALL_EVAL = ("--config.eval.num_samples=100", "--config.eval.reference_num_images=1000",
              "--config.eval.bpd_num_images=10")


def settings(network) -> dict[str, dict]:
    """name -> {"chunk", "layout", "network", "threads", "autocast"} of each measured setting."""
    from evaluation.inception import DEFAULT_CHUNK

    adopted = DEFAULT_CHUNK["cpu"]
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(network.eval()))
    plain = {"layout": "channels_last", "network": network, "threads": 0, "autocast": None}
    found = {f"{chunk} images per call": {**plain, "chunk": chunk} for chunk in sorted({8, adopted, 32, FORMER_CHUNK})}
    found[f"{adopted} per call, NCHW input"] = {**plain, "chunk": adopted, "layout": "nchw"}
    found[f"{adopted} per call, frozen graph"] = {**plain, "chunk": adopted, "network": frozen}
    found[f"{adopted} per call, 1 thread"] = {**plain, "chunk": adopted, "threads": 1}
    found[f"{adopted} per call, bf16 autocast"] = {**plain, "chunk": adopted, "autocast": torch.bfloat16}
    return found


def extract(images: torch.Tensor, setting: dict) -> torch.Tensor:
    """Features of uint8 ``images`` under ``setting`` (``InceptionFeatures.forward`` unrolled)."""
    from evaluation.inception import inception_input

    threads = torch.get_num_threads()
    if setting["threads"]:
        torch.set_num_threads(setting["threads"])
    try:
        chunks = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=setting["autocast"] or torch.bfloat16,
                                                     enabled=setting["autocast"] is not None):
            for start in range(0, len(images), setting["chunk"]):
                batch = inception_input(images[start:start + setting["chunk"]])
                if setting["layout"] == "nchw":
                    batch = batch.contiguous()
                chunks.append(setting["network"](batch).float())
        return torch.cat(chunks)
    finally:
        torch.set_num_threads(threads)


def throughput(images: torch.Tensor, found: dict[str, dict], repeats: int, slow_images: int) -> dict[str, dict]:
    """Best images/s over ``repeats`` alternating rounds per setting (bf16: ``slow_images`` only
    where the CPU lacks native bf16, where it is an order of magnitude slower)."""
    best: dict[str, float] = {}
    counts = {name: slow_images if setting["autocast"] is not None else len(images)
              for name, setting in found.items()}
    for name, setting in found.items():  # a warm-up call each
        extract(images[:setting["chunk"]], setting)
    for _ in range(repeats):
        for name, setting in found.items():
            started = time.perf_counter()
            extract(images[:counts[name]], setting)
            best[name] = max(best.get(name, 0.0), counts[name] / (time.perf_counter() - started))
    return {name: {"images_per_s": best[name], "images": counts[name], "chunk": found[name]["chunk"]}
            for name in found}


def release_samples(count: int) -> torch.Tensor:
    """``count`` uint8 samples of the released model: DPM-Solver++ at 20 steps, seed 0."""
    from sde import api, data, samplers

    pipeline = api.load(REPO / RELEASE_WEIGHTS)
    generator = torch.Generator().manual_seed(0)
    x, _ = samplers.sample("dpm_solver", pipeline.model, pipeline.sde, data.sample_shape(pipeline.config, count),
                           steps=20, generator=generator, disable=True)
    return data.float_to_uint8(x, dequantized=False)


def fid_difference(samples: torch.Tensor, found: dict[str, dict], former: str, adopted: str) -> dict:
    """FID of the same samples through the former and the adopted setting, against the release
    config's reference statistics (the per-machine cache; computed on a first run)."""
    from evaluation import FeatureSet, InceptionFeatures, compare_feature_sets
    from bench.common import load_config
    from sde.quality import reference_features

    config = load_config(str(REPO / RELEASE_CONFIG))
    reference = reference_features(config, InceptionFeatures())
    features = {name: extract(samples, found[name]) for name in (former, adopted)}
    fids = {}
    for name, feature in features.items():
        feature_set = FeatureSet.empty(feature.shape[1])
        feature_set.update(feature.double())
        fids[name] = compare_feature_sets(feature_set, reference)["fid"]
    return {"num_samples": len(samples), "reference_images": reference.count,
            "fid_former": fids[former], "fid_adopted": fids[adopted],
            "fid_difference": fids[adopted] - fids[former],
            "max_feature_difference": float((features[adopted] - features[former]).abs().max())}


def eval_wall_times() -> dict:
    """The README's small eval of the release twice, in two workdirs sharing an empty cache."""
    import os

    times = {}
    with tempfile.TemporaryDirectory(prefix="inception_speed_") as tmp:
        environment = {**os.environ, "SDE_CACHE_DIR": str(Path(tmp) / "cache")}
        for run in ("first", "cached"):
            command = [sys.executable, "main.py", "--config", RELEASE_CONFIG, "--mode=eval",
                       f"--workdir={Path(tmp) / run}", f"--config.sampling.checkpoint={RELEASE_WEIGHTS}",
                       *SMALL_EVAL]
            started = time.perf_counter()
            result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
            times[run] = time.perf_counter() - started
    return {"command": ("python main.py --config " + RELEASE_CONFIG + " --mode eval --workdir runs/release_small "
                        f"--config.sampling.checkpoint={RELEASE_WEIGHTS} " + " ".join(SMALL_EVAL)),
            "first_run_s": times["first"], "cached_run_s": times["cached"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="MNIST images per throughput round")
    parser.add_argument("--slow-images", type=int, default=16, help="images per round of bf16 autocast")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fid-samples", type=int, default=300)
    parser.add_argument("--skip-eval", action="store_true", help="leave out the two eval runs")
    add_run_options(parser)
    args = parser.parse_args()
    apply_threads(args)
    from configs.mnist_vp import get_config
    from evaluation import InceptionFeatures
    from evaluation.inception import DEFAULT_CHUNK
    from sde import data

    images, _ = data.load_dataset(get_config())
    images = torch.as_tensor(images[:args.images])
    found = settings(InceptionFeatures().network)
    speeds = throughput(images, found, args.repeats, args.slow_images)
    former, adopted = f"{FORMER_CHUNK} images per call", f"{DEFAULT_CHUNK['cpu']} images per call"
    quality = fid_difference(release_samples(args.fid_samples), found, former, adopted)
    result = {"threads": torch.get_num_threads(), "settings": speeds, "former": former, "adopted": adopted,
              "speedup": speeds[adopted]["images_per_s"] / speeds[former]["images_per_s"],
              "fid": quality, "fid_tolerance": FID_TOLERANCE,
              "eval": None if args.skip_eval else eval_wall_times()}
    write_result(args, NAME, TITLE, result, render)
    return 0 if abs(quality["fid_difference"]) <= FID_TOLERANCE else 1


def render(result: dict) -> str:
    former = result["settings"][result["former"]]["images_per_s"]
    rows = [[name + (" (former default)" if name == result["former"] else "")
             + (" (adopted)" if name == result["adopted"] else ""),
             f"{reading['images_per_s']:.2f}", f"{reading['images_per_s'] / former:.2f}x", reading["images"]]
            for name, reading in result["settings"].items()]
    quality = result["fid"]
    parts = [f"Inception-v3 on {result['threads']} threads (float32 unless said), best of the alternating rounds:",
             "", table(["setting", "images/s", "vs former", "images timed"], rows), "",
             f"FID of {quality['num_samples']} release samples against {quality['reference_images']:,} reference "
             f"images: {quality['fid_former']:.4f} with the former setting, {quality['fid_adopted']:.4f} with "
             f"the adopted one (difference {quality['fid_difference']:+.2g}; tolerance {result['fid_tolerance']}; "
             f"largest feature difference {quality['max_feature_difference']:.2g})."]
    lines = [f"The adopted setting ({result['adopted']}) runs {result['speedup']:.2f}x the former's images/s "
             f"with the same features; the others were measured and not adopted."]
    if result["eval"]:
        run = result["eval"]
        parts += ["", table(["the small eval of the release", "wall time"],
                            [["first run on the machine (computes 1,000 reference images' statistics)",
                              f"{run['first_run_s'] / 60:.1f} min"],
                             ["a second workdir (statistics from the per-machine cache)",
                              f"{run['cached_run_s'] / 60:.1f} min"]]), "", f"`{run['command']}`"]
        lines.append(f"A second eval against the same reference takes {run['cached_run_s'] / run['first_run_s']:.0%} "
                     f"of the first; before the cache was per machine, every new workdir paid the first run.")
    return "\n".join(parts + ["", format_reading(lines)])


if __name__ == "__main__":
    sys.exit(main())
