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

import torch

from sde import checkpoint
from sde.models import create_model

#: The MNIST files shipped in the package (the test split and train5k), MD5-checked on read.
MNIST_DIR = Path(__file__).resolve().parents[1] / "assets" / "mnist"
#: The tiny config on the embedded MNIST test split, offline (as ``make_tiny_config``), for main.py.
TINY_ARGS = ("--config", "configs/tiny.py", f"--config.data.data_dir={MNIST_DIR}",
             "--config.data.split=test", "--config.data.download=False")


def flip_bit(content: bytes, bit: int) -> bytes:
    """``content`` with bit number ``bit`` (0 = the lowest bit of the first byte) inverted."""
    index, mask = divmod(bit, 8)
    return content[:index] + bytes([content[index] ^ (1 << mask)]) + content[index + 1:]


def dead_pid() -> int:
    """The process id of a process that has ended (for temporary files of killed writers)."""
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def identical(a, b) -> bool:
    """Bit-for-bit equality of two nested checkpoint structures."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


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
    model = create_model(wider)
    state = model.state_dict()
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint.save_checkpoint(tmp / "run" / "checkpoints", 3,
                               {"model": state, "ema": state, "optimizer": optimizer.state_dict(), "step": 3,
                                "data": {}, "rng": {}}, keep=1)
    return []


def _run_of_another_config(tmp: Path) -> list[str]:
    """A workdir as a tiny VP run leaves it: its config.json and a checkpoint (of no weights:
    the config is compared before anything is loaded)."""
    import json

    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(make_tiny_config().to_dict(), default=list))
    checkpoint.save_checkpoint(run / "checkpoints", 3, {"ema": {}, "step": 3}, keep=1)
    return []


def _weights(change: Callable, name: str, as_checkpoint: bool = False,
             option: str = "sampling.checkpoint") -> Callable[[Path], list[str]]:
    """Weights of the tiny model changed by ``change``, given to the run as ``option``: exported
    .safetensors (``change`` maps the file's bytes, written with a digest, to the bytes stored)
    or a checkpoint ``.pt`` (``change`` maps the checkpoint dict to what is saved)."""
    def prepare(tmp: Path) -> list[str]:
        config = make_tiny_config()
        model = create_model(config)
        path = tmp / name
        if as_checkpoint:
            torch.save(change({"model": model.state_dict(), "ema": model.state_dict(), "step": 3}), path)
        else:
            import json

            metadata = {"step": "3", "config": json.dumps(config.to_dict(), default=list)}
            checkpoint.export_safetensors(model, path, metadata)
            path.write_bytes(change(path.read_bytes()))
        return [f"--config.{option}={path}"]
    return prepare


def _nan_state(state: dict) -> dict:
    return {**state, "ema": {k: torch.full_like(v, float("nan")) for k, v in state["ema"].items()}}


def _nan_weights_file(content: bytes) -> bytes:
    """Exported weights whose every float is NaN, with a digest that matches (so that only the
    finiteness check can refuse them)."""
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import load, save

    tensors = {k: torch.full_like(v, float("nan")) for k, v in load(content).items()}
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(content)
        handle.flush()
        with safe_open(handle.name, framework="pt") as opened:
            metadata = {k: v for k, v in opened.metadata().items() if k != checkpoint.DIGEST_KEY}
    return save(tensors, metadata={**metadata, checkpoint.DIGEST_KEY: checkpoint.weights_digest(tensors, metadata)})


def _flip_last_tensor_byte(content: bytes) -> bytes:
    return content[:-3] + bytes([content[-3] ^ 0x10]) + content[-2:]


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
    # numeric values out of their rule (sde/config_rules.py): refused in configuration.validate
    BadInput("lr nan", ("--config.training.lr=nan",), r"training\.lr must be a finite number > 0, got nan"),
    BadInput("lr inf", ("--config.training.lr=inf",), r"training\.lr must be a finite number > 0, got inf"),
    BadInput("warmup -1", ("--config.training.warmup=-1",), r"training\.warmup must be an integer >= 0, got -1"),
    BadInput("grad_clip -1", ("--config.training.grad_clip=-1",),
             r"training\.grad_clip must be a finite number >= 0 \(0 turns clipping off\), got -1\.0"),
    BadInput("divergence_factor 1.5", ("--config.training.divergence_factor=1.5",),
             r"training\.divergence_factor must be 0 \(off\) or a finite number >= 2, got 1\.5"),
    BadInput("dropout 1.5", ("--config.model.dropout=1.5",), r"model\.dropout must be in \[0, 1\), got 1\.5"),
    BadInput("ema_rate nan", ("--config.model.ema_rate=nan",), r"model\.ema_rate must be in \[0, 1\), got nan"),
    BadInput("beta_max below beta_min", ("--config.sde.beta_max=0.05",),
             r"sde\.beta_max must be a finite number > sde\.beta_min \(0\.1\), got 0\.05"),
    BadInput("sample: seed -1", ("--config.sampling.seed=-1",), r"sampling\.seed must be an integer >= 0, got -1",
             mode="sample"),
    BadInput("eval: bpd_truncation -1", ("--config.eval.bpd_truncation=-1",),
             r"eval\.bpd_truncation must be a finite number > 0, got -1\.0", mode="eval"),
    BadInput("eval: one reference image", ("--config.eval.reference_num_images=1",),
             r"eval\.reference_num_images must be 0 \(all\) or an integer >= 2 \(FID needs at least 2 images\), "
             r"got 1", mode="eval"),
    BadInput("compare: num_samples 1", ("--config.compare.num_samples=1",),
             r"compare\.num_samples must be an integer >= 2 \(FID needs at least 2 images\), got 1", mode="compare"),
    BadInput("align_steps: learning_rate 0", ("--config.align_steps.learning_rate=0",),
             r"align_steps\.learning_rate must be a finite number > 0, got 0\.0", mode="align_steps"),
    BadInput("sample: ode rtol 0", ("--config.sampling.method=ode", "--config.sampling.options.rtol=0"),
             r"sampling\.options: rtol must be positive, got 0\.0", mode="sample"),
    BadInput("sample: explicit schedule not decreasing",
             (f"--config.sampling.options.schedule={Path(__file__).parent / 'schedules' / 'not_decreasing.json'}",),
             r"sampling\.options: an explicit schedule must decrease strictly from T to a time > 0, "
             r"got \[1\.0, 0\.3, 0\.5, 0\.001\]", mode="sample"),
    BadInput("sample: explicit schedule with NaN",
             (f"--config.sampling.options.schedule={Path(__file__).parent / 'schedules' / 'nan.json'}",),
             r"sampling\.options: an explicit schedule's times must be finite numbers, got \[1\.0, nan, ",
             mode="sample"),
    BadInput("resume under another sde", ("--config.sde.name=subvp",),
             r"holds a run trained with another config: sde\.name='subvp' \(the run: 'vp'\)\. Resume with the "
             r"run's config", prepare=_run_of_another_config),
    BadInput("resume under another model", ("--config.model.nf=16",),
             r"another config: model\.nf=16 \(the run: 8\)", prepare=_run_of_another_config),
    BadInput("resume on other data", ("--config.data.classes=(3,)",),
             r"another config: data\.classes=\[3\] \(the run: \[\]\)", prepare=_run_of_another_config),
    BadInput("resume in discrete time", ("--config.training.continuous=False",),
             r"another config: training\.continuous=False \(the run: True\)", prepare=_run_of_another_config),
    BadInput("sample: weights with a flipped bit", (),
             r"weights \S+flipped\.safetensors are damaged: their content does not match the SHA-256 digest",
             prepare=_weights(_flip_last_tensor_byte, "flipped.safetensors"), mode="sample"),
    BadInput("sample: NaN weights", (), r"weights \S+nan\.safetensors: \S+ holds \d+ non-finite values",
             prepare=_weights(_nan_weights_file, "nan.safetensors"), mode="sample"),
    BadInput("sample: a checkpoint with NaN EMA weights", (),
             r"nan\.pt \(ema weights\): \S+ holds \d+ non-finite values",
             prepare=_weights(_nan_state, "nan.pt", as_checkpoint=True), mode="sample"),
    BadInput("sample: a bare tensor as the checkpoint", (), r"bare\.pt holds a Tensor, not a checkpoint",
             prepare=_weights(lambda state: torch.zeros(3), "bare.pt", as_checkpoint=True), mode="sample"),
    BadInput("sample: a checkpoint without EMA", (), r"no_ema\.pt is not a training checkpoint of this toolkit: "
             r"it lacks 'ema'", prepare=_weights(lambda state: {"model": state["model"], "step": 3}, "no_ema.pt",
                                                 as_checkpoint=True), mode="sample"),
    BadInput("train: NaN init weights", (), r"weights \S+nan_init\.safetensors: \S+ holds \d+ non-finite values",
             prepare=_weights(_nan_weights_file, "nan_init.safetensors", option="training.init_weights")),
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


#: A ``sitecustomize`` that injects operating-system faults into a main.py subprocess, driven
#: by environment variables (tests run as root, where file modes stop nothing):
#: FAULT_READ=<file name>: reading it (``Path.read_bytes``) fails with EIO;
#: FAULT_FSYNC=<name prefix>:<n>: the n-th fsync of a temporary file whose name starts with
#: ``.<name prefix>`` fails with ENOSPC (a disk that fills up while a checkpoint is written).
_FAULT_HOOKS = '''
import errno, os, pathlib

_read_bytes = pathlib.Path.read_bytes
def _failing_read_bytes(path):
    if path.name == os.environ.get("FAULT_READ"):
        raise OSError(errno.EIO, "Input/output error", str(path))
    return _read_bytes(path)
pathlib.Path.read_bytes = _failing_read_bytes

_fsync, _fsyncs = os.fsync, [0]
def _failing_fsync(fd):
    prefix, _, nth = os.environ.get("FAULT_FSYNC", "").partition(":")
    if prefix:
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            name = ""
        if name.startswith("." + prefix) and name.endswith(".tmp"):
            _fsyncs[0] += 1
            if _fsyncs[0] == int(nth):
                raise OSError(errno.ENOSPC, "No space left on device")
    return _fsync(fd)
os.fsync = _failing_fsync
'''


def fault_environment(tmp: Path, **faults: str) -> dict[str, str]:
    """The environment of a subprocess with ``_FAULT_HOOKS`` installed and ``faults`` (e.g.
    ``FAULT_READ="t10k-labels-idx1-ubyte.gz"``) switched on."""
    hooks = Path(tmp) / "fault_hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(_FAULT_HOOKS)
    env = {key: value for key, value in os.environ.items() if key != "SDE_TRACEBACK"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH", "")]))
    return {**env, "OMP_NUM_THREADS": "1", **faults}
