"""Fault fixtures: bad inputs and the tiny training run, shared by tests/test_faults.py and
bench/fault_injection.py (``python -m bench.fault_injection`` runs the same faults many
times over)."""
from __future__ import annotations

import gzip
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sde import checkpoint
from sde.models import create_model

#: The MNIST files shipped in the package (the test split and train5k), MD5-checked on read.
MNIST_DIR = Path(__file__).resolve().parents[1] / "assets" / "mnist"
#: The tiny config on the embedded MNIST test split, offline (as ``make_tiny_config``), for main.py.
TINY_ARGS = ("--config", "configs/tiny.py", f"--config.data.data_dir={MNIST_DIR}",
             "--config.data.split=test", "--config.data.download=False")


def make_tiny_config(continuous: bool = True, **training):
    """configs/tiny.py on the MNIST test split shipped in the package, offline."""
    from configs import tiny

    config = tiny.get_config()
    config.data.data_dir = str(MNIST_DIR)
    config.data.split = "test"
    config.data.download = False
    config.training.continuous = continuous
    for key, value in training.items():
        config.training[key] = value
    return config


@dataclass(frozen=True)
class BadInput:
    """One bad input: CLI overrides of the tiny config, and the error line it must produce.

    ``prepare(tmp)`` builds files in ``tmp`` and returns further overrides (and may name
    the workdir with ``--workdir=``); ``cli_only`` inputs fail while absl parses the flags,
    so they have no in-process form.
    """

    name: str
    overrides: tuple[str, ...]
    match: str
    prepare: Callable[[Path], list[str]] | None = None
    cli_only: bool = False
    mode: str = "train"


def _copy_mnist(tmp: Path) -> Path:
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for source in MNIST_DIR.glob("t10k-*-ubyte.gz"):
        shutil.copy(source, data_dir / source.name)
    return data_dir


def _corrupt_images(change: Callable[[bytes], bytes], compressed: bool = True) -> Callable[[Path], list[str]]:
    """A copy of the MNIST test split whose image file is changed (decompressed or raw)."""
    def prepare(tmp: Path) -> list[str]:
        data_dir = _copy_mnist(tmp)
        images = data_dir / "t10k-images-idx3-ubyte.gz"
        content = images.read_bytes()
        images.write_bytes(gzip.compress(change(gzip.decompress(content)), compresslevel=1) if compressed
                          else change(content))
        return [f"--config.data.data_dir={data_dir}"]
    return prepare


def _damaged_heldout_file(tmp: Path) -> list[str]:
    """A data folder whose train5k images file is there but is not the published one."""
    folder = tmp / "damaged"
    folder.mkdir(exist_ok=True)
    (folder / "train5k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(12)))
    return [f"--config.data.data_dir={folder}"]


def _workdir_under_a_file(tmp: Path) -> list[str]:
    """A workdir that cannot be created even by root: its parent is a regular file."""
    (tmp / "a_file").write_text("not a directory")
    return [f"--workdir={tmp / 'a_file' / 'run'}"]


def _checkpoint_of_a_wider_model(tmp: Path) -> list[str]:
    wider = make_tiny_config()
    wider.model.nf = 16
    state = create_model(wider).state_dict()
    checkpoint.save_checkpoint(tmp / "run" / "checkpoints", 3, {"model": state, "ema": state}, keep=1)
    return []


def _schedule_file(tmp: Path) -> list[str]:
    """A schedule file of 3 levels, given as the sampler's schedule."""
    (tmp / "schedule3.json").write_text('{"t": [1.0, 0.3, 0.001]}')
    return [f"--config.sampling.options.schedule={tmp / 'schedule3.json'}"]


IDX_LABELS_MAGIC_BYTES = (2049).to_bytes(4, "big")
BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("unknown sde", ("--config.sde.name=vpp",), r"unknown sde\.name 'vpp'; accepted: vp, subvp, ve"),
    BadInput("unknown sampler", ("--config.sampling.method=euler",),
             r"unknown sampling\.method 'euler'; accepted: ancestral, ddim, .*heun"),
    BadInput("unknown dataset", ("--config.data.dataset=imagenet",),
             r"unknown data\.dataset 'imagenet'; accepted: cifar10, mnist, toy"),
    BadInput("unknown model", ("--config.model.name=resnet",), r"unknown model\.name 'resnet'; accepted: unet, mlp"),
    BadInput("unknown sde schedule", ("--config.sde.schedule=quadratic",),
             r"unknown sde\.schedule 'quadratic'; accepted: linear, cosine"),
    BadInput("batch_size 0", ("--config.training.batch_size=0",),
             r"training\.batch_size must be a positive integer, got 0"),
    BadInput("n_iters -5", ("--config.training.n_iters=-5",), r"training\.n_iters must be a positive integer, got -5"),
    BadInput("snapshot_freq 0", ("--config.training.snapshot_freq=0",),
             r"training\.snapshot_freq must be a positive integer, got 0"),
    BadInput("model.nf 0", ("--config.model.nf=0",), r"model\.nf must be a positive integer, got 0"),
    BadInput("sampling.steps 0", ("--config.sampling.steps=0",), r"sampling\.steps must be a positive integer, got 0"),
    BadInput("sample mode: num_samples 0", ("--config.sampling.num_samples=0",),
             r"sampling\.num_samples must be a positive integer, got 0", mode="sample"),
    BadInput("eta 1.5", ("--config.sampling.options.eta=1.5",), r"sampling\.options: eta must lie in \[0, 1\], got 1\.5"),
    BadInput("eta -0.1", ("--config.sampling.options.eta=-0.1",),
             r"sampling\.options: eta must lie in \[0, 1\], got -0\.1"),
    BadInput("sampling eps 0", ("--config.sampling.options.eps=0.0",),
             r"sampling\.options: eps must lie in \(0, T=1\), got 0\.0"),
    BadInput("training eps 1", ("--config.training.eps=1.0",), r"training\.eps must be in \(0, 1\), got 1\.0"),
    BadInput("image_size 32", ("--config.data.image_size=32",),
             r"mnist images are 28x28 with 1 channel\(s\), but the config has image_size=32, num_channels=1"),
    BadInput("num_channels 3", ("--config.data.num_channels=3",),
             r"mnist images are 28x28 with 1 channel\(s\), but the config has image_size=28, num_channels=3"),
    BadInput("option the sampler does not take", ("--config.sampling.options.snr=0.2",),
             r"sampling\.options: unknown option\(s\) snr for sampler 'ddim'; accepted: "),
    BadInput("unknown sampling option key", ("--config.sampling.options.bogus=1",),
             r"--config\.sampling\.options\.bogus: unknown config key 'bogus' in config\.sampling\.options; "
             r"accepted: atol, .*variance", cli_only=True),
    BadInput("unknown training key", ("--config.training.bogus=1",),
             r"--config\.training\.bogus: unknown config key 'bogus' in config\.training; accepted: amp, ",
             cli_only=True),
    BadInput("unparsable value", ("--config.training.n_iters=ten",),
             r"bad command line: flag --config\.training\.n_iters=ten: ", cli_only=True),
    BadInput("unknown mode", ("--mode=fit",), r"bad command line: flag --mode=fit: value should be one of",
             cli_only=True),
    BadInput("architecture differs from the checkpoint", (),
             r"checkpoint of step 3 does not match the configured model architecture \(shape differs: "
             r"\S+, .*\); check config\.model", prepare=_checkpoint_of_a_wider_model),
    BadInput("dataset file with a bad magic number", (),
             r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published 9fb629c4189551a2d022fa330f9573f3",
             prepare=_corrupt_images(lambda raw: IDX_LABELS_MAGIC_BYTES + raw[4:])),
    BadInput("dataset file of the wrong size", (), r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published",
             prepare=_corrupt_images(lambda raw: raw + bytes(28 * 28))),
    BadInput("dataset file truncated", (), r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published",
             prepare=_corrupt_images(lambda gz: gz[:len(gz) // 2], compressed=False)),
    BadInput("dataset file with one flipped bit", (),
             r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published",
             prepare=_corrupt_images(lambda raw: raw[:5000] + bytes([raw[5000] ^ 1]) + raw[5001:])),
    BadInput("damaged data file", ("--config.data.split=train5k",),
             r"train5k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published 6057ca5a",
             prepare=_damaged_heldout_file),
    BadInput("unwritable workdir", (), r"workdir \S+/a_file/run cannot be created: Not a directory",
             prepare=_workdir_under_a_file),
    BadInput("sample: missing schedule file", ("--config.sampling.options.schedule=missing.json",),
             r"sampling\.options: schedule file missing\.json does not exist", mode="sample"),
    BadInput("sample: schedule file of another step count",
             ("--config.sampling.steps=5",),
             r"sampling\.options: the explicit schedule has 3 times, so it needs steps=3, got steps=5",
             mode="sample", prepare=_schedule_file),
    BadInput("align_steps: too few steps", ("--config.sampling.steps=2",),
             r"align_steps needs sampling\.steps >= 3 \(the ends stay fixed\), got 2", mode="align_steps"),
    BadInput("eval: unknown dequantization", ("--config.eval.bpd_dequantization=gaussian",),
             r"unknown eval\.bpd_dequantization 'gaussian'; accepted: uniform, truncated_normal", mode="eval"),
    BadInput("eval: truncation past T", ("--config.eval.bpd_dequantization=truncated_normal",
                                         "--config.eval.bpd_truncation=1e-9"),
             r"eval\.bpd_truncation: truncation tau=1e-09 puts t0 outside \(0, T\)", mode="eval"),
    BadInput("train: missing init weights", ("--config.training.init_weights=missing.safetensors",),
             r"training\.init_weights='missing\.safetensors' does not exist"),
)


def cli_command(bad: BadInput, tmp: Path) -> list[str]:
    """The main.py command line of ``bad`` (its files built in ``tmp``)."""
    extra = bad.prepare(tmp) if bad.prepare else []
    workdir = [arg for arg in extra if arg.startswith("--workdir=")] or [f"--workdir={tmp / 'run'}"]
    return [sys.executable, "main.py", *TINY_ARGS, f"--mode={bad.mode}", *workdir, *bad.overrides,
            *(arg for arg in extra if not arg.startswith("--workdir="))]


class TouchMarker:
    """Unpickling this runs ``os.system("touch <marker>")``: the classic pickle payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
