"""2 gloo processes (torchrun, CPU, loopback only): training, eval, compare and sample.

Training: the ranks must hold identical weights (model and EMA) after training, only rank 0
may write (checkpoints, TensorBoard, config.json, sample grids), and the run must match a
single process with the same global batch: BatchStream gives each rank its rows of every
global batch and the loss draws the global batch's noise and keeps the rank's slice, so
the only difference is the order of the floating-point gradient sum.

Eval, compare and sample: each rank does its share of the batches and the results must
not depend on the number of processes -- per-image bits/dim, held-out loss, KID sample,
class histogram and the sample array bit for bit, FID moments up to float64 round-off --
with only rank 0 writing. Fast tests check the combination rules in one process (shards
summed with numpy); a slow one runs the three modes under torchrun against one process.

This file is also the worker: torchrun runs it as a script (``__main__`` below), once per
rank. Every launch runs in its own process group with a timeout, killed on any failure.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
#: tiny config: 16 images per global batch -> 8 per rank; a checkpoint every 2 steps.
N_ITERS, SNAPSHOT_FREQ = 4, 2
#: Seconds a torchrun launch may take before it is killed (imports dominate: ~3 processes).
LAUNCH_TIMEOUT_S = 240
#: Single-process vs 2 ranks: the gradient is summed in another order, nothing else differs.
#: The weight updates and Adam moments then agree to ~1e-4 of their size (float32 round-off
#: through a few Adam steps), while a wrong noise slice or data shard changes them by O(1).
RELATIVE_TOLERANCE = 1e-2
#: The loss of the same global batch, summed in another order (a rank's half differs by ~1e-2).
LOSS_TOLERANCE = 1e-5
#: |Adam step| <= lr (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr at worst (Kingma & Ba 2015, Sec. 2.1).
ADAM_STEP_BOUND = 4


def ddp_config(n_iters: int = N_ITERS):
    """configs/tiny.py on the MNIST test split, no dropout, cheap final sample grid."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import make_tiny_config

    config = make_tiny_config(n_iters=n_iters, snapshot_freq=SNAPSHOT_FREQ, log_freq=SNAPSHOT_FREQ,
                              sample_freq=n_iters)
    config.model.dropout = 0.0
    config.sampling.steps = 1
    config.device = "cpu"
    return config


# ---- the worker (one per rank, under torchrun) -----------------------------------------
def run_worker(workdir: Path, out_dir: Path, n_iters: int) -> None:
    """Train with ``sde.modes.train.train`` and record, per rank, what it wrote and its weights.

    The recording wrappers call through to the real functions; they only note the rank.
    """
    from sde import checkpoint, distributed, workdir as workdir_module
    from sde.modes import train as run_train

    rank = int(os.environ["RANK"])
    writes: list[str] = []
    models: list[torch.nn.Module] = []
    emas: list[run_train.EMA] = []

    def recording(name, function):
        def wrapper(*args, **kwargs):
            writes.append(name)
            return function(*args, **kwargs)
        return wrapper

    real_create_model = run_train.create_model

    def create_model(config):
        models.append(real_create_model(config))
        return models[-1]

    class RecordingEMA(run_train.EMA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            emas.append(self)

    run_train.create_model = create_model
    run_train.EMA = RecordingEMA
    checkpoint.save_checkpoint = recording("checkpoint", checkpoint.save_checkpoint)
    run_train.SummaryWriter = recording("tensorboard", run_train.SummaryWriter)
    run_train._write_samples = recording("samples", run_train._write_samples)
    workdir_module.Workdir.write_config = recording("config.json", workdir_module.Workdir.write_config)

    summary = run_train.train(ddp_config(n_iters), workdir)
    torch.save({"model": models[0].state_dict(), "ema": emas[0].model.state_dict()},
               out_dir / f"weights_{rank}.pt")
    (out_dir / f"summary_{rank}.json").write_text(json.dumps({**summary, "writes": writes}))
    distributed.teardown()


class PooledPixels:
    """Stands in for ``InceptionFeatures`` (same constructor): the 16 means of 7x7 pixel
    blocks, so that FID and KID run without the Inception network."""

    def __init__(self, path=None, device="cpu", batch_size: int = 50):
        del path, device, batch_size

    def cache_key(self) -> dict:
        return {"extractor": "pooled 7x7 pixel blocks"}

    def __call__(self, images) -> torch.Tensor:
        return F.avg_pool2d(torch.as_tensor(images).float(), 7).flatten(1).double()


def evaluation_config():
    """The tiny config with uneven shares for 2 ranks: 2 held-out batches, 8 reference
    batches (the last short), 7 eval/compare sample batches and 5 sample-mode batches."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import make_tiny_config

    config = make_tiny_config()
    config.device = "cpu"
    config.eval.batch_size = 4
    config.eval.bpd_num_images = 6
    config.eval.bpd_repeats = 2
    config.eval.reference_num_images = 30
    config.eval.num_samples = 20
    config.sampling.steps = 3
    config.sampling.batch_size = 3
    config.sampling.num_samples = 13
    config.compare.runs = ("ddim:2",)
    config.compare.num_samples = 20
    return config


def run_modes(workdir: Path) -> dict:
    """``--mode eval``, ``compare`` and ``sample`` on ``workdir`` (the caller has replaced
    ``evaluation.InceptionFeatures`` by `PooledPixels`)."""
    from sde.modes.compare import compare
    from sde.modes.evaluate import evaluate
    from sde.modes.sample import sample

    config = evaluation_config()
    config.eval.cache_dir = str(workdir / "fid_cache")  # each run computes its own reference statistics
    return {"eval": evaluate(config, workdir), "compare": compare(config, workdir),
            "sample": sample(config, workdir)}


def run_evaluation_worker(workdir: Path, out_dir: Path) -> None:
    """`run_modes` on this rank; what each mode returned goes to ``results_<rank>.json``."""
    import evaluation
    from sde import distributed

    evaluation.InceptionFeatures = PooledPixels
    results = run_modes(workdir)
    (out_dir / f"results_{os.environ['RANK']}.json").write_text(json.dumps(results, default=str))
    distributed.teardown()


# ---- launching -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_torchrun(out_dir: Path, task: str, *args) -> subprocess.Popen:
    """torchrun on this file (``task``: "train" or "evaluate"); its output goes to
    ``out_dir/torchrun.log`` (no pipe to block on)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(Path(__file__).resolve()), str(out_dir), task, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    with open(out_dir / "torchrun.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    process.out_dir = out_dir
    return process


def output_of(process: subprocess.Popen) -> str:
    return (process.out_dir / "torchrun.log").read_text()[-4000:]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own, so
    killing torchrun's process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def workers(process: subprocess.Popen) -> list[int]:
    """The launch's workers: torchrun's descendants while it runs, plus the pids the workers
    recorded that still run this file (a worker orphaned by a dead torchrun)."""
    pids = descendants(process.pid) if process.poll() is None else []
    for pid_file in process.out_dir.glob("pid_*"):
        cmdline = Path("/proc") / pid_file.read_text() / "cmdline"
        if cmdline.exists() and str(Path(__file__).resolve()) in cmdline.read_bytes().decode(errors="replace"):
            pids.append(int(pid_file.read_text()))
    return pids


def kill_launch(process: subprocess.Popen) -> None:
    """SIGKILL torchrun, its process group and every worker; reap torchrun."""
    for pid in workers(process):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def finish(process: subprocess.Popen, timeout_s: float = LAUNCH_TIMEOUT_S) -> str:
    """Wait for the launch; on timeout kill it and every worker, and fail."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_launch(process)
        pytest.fail(f"torchrun did not finish within {timeout_s} s (killed):\n{output_of(process)}")
    assert process.returncode == 0, f"torchrun exited with {process.returncode}:\n{output_of(process)}"
    return output_of(process)


@pytest.fixture
def launch():
    """Start torchrun launches; whatever happens in the test, none outlives it."""
    started: list[subprocess.Popen] = []

    def start(*args) -> subprocess.Popen:
        started.append(start_torchrun(*args))
        return started[-1]

    yield start
    for process in started:
        kill_launch(process)


def load_rank_results(out_dir: Path) -> list[tuple[dict, dict]]:
    return [(json.loads((out_dir / f"summary_{rank}.json").read_text()),
             torch.load(out_dir / f"weights_{rank}.pt", weights_only=True)) for rank in range(WORLD_SIZE)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    error = (actual - expected).abs().max() / scale
    assert error <= RELATIVE_TOLERANCE, f"{name}: relative difference {error:.2e}"


# ---- tests ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_gloo_ranks_match_each_other_and_a_single_process(tmp_path, launch):
    from sde import checkpoint
    from sde.modes.train import train

    workdir, out_dir = tmp_path / "ddp", tmp_path / "out"
    out_dir.mkdir()
    process = launch(out_dir, "train", workdir, N_ITERS)
    single = tmp_path / "single"
    train(ddp_config(), single)  # meanwhile, the same global batch in one process
    finish(process)

    (summary_0, weights_0), (summary_1, weights_1) = load_rank_results(out_dir)
    assert summary_0["step"] == summary_1["step"] == N_ITERS
    for part in ("model", "ema"):
        for key, value in weights_0[part].items():
            assert torch.equal(value, weights_1[part][key]), f"ranks differ in {part}.{key}"

    assert sorted(set(summary_0["writes"])) == ["checkpoint", "config.json", "samples", "tensorboard"]
    assert summary_1["writes"] == [], f"rank 1 wrote {summary_1['writes']}"
    assert [step for step, _ in checkpoint.list_checkpoints(workdir / "checkpoints")] == [2, 4]
    assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 1

    ddp = checkpoint.load_checkpoint(workdir / "checkpoints" / f"checkpoint_{N_ITERS}.pt")
    reference = checkpoint.load_checkpoint(single / "checkpoints" / f"checkpoint_{N_ITERS}.pt")
    assert ddp["data"] == reference["data"]
    for part in ("model", "ema"):
        for key in reference[part]:
            assert torch.equal(ddp[part][key], weights_0[part][key]), f"checkpoint is not rank 0's {part}.{key}"
    # Adam moves a weight by about lr per step, far less than the weights themselves:
    # compare what training changed, so that a wrong gradient cannot hide in the weights.
    init = weights_at_init()
    lr = ddp_config().training.lr
    largest_update = max((reference["model"][k] - v).abs().max().item() for k, v in init.items())
    assert 0 < largest_update < ADAM_STEP_BOUND * lr * N_ITERS, "weights_at_init is not train's initialisation"
    for key, value in init.items():
        assert_close(ddp["model"][key] - value, reference["model"][key] - value, f"update of {key}")
    for index, moments in reference["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert_close(ddp["optimizer"]["state"][index][name], moments[name], f"optimizer {index}.{name}")
    # The logged loss is the global batch's (averaged over ranks), not rank 0's half.
    ddp_losses, single_losses = logged_losses(workdir), logged_losses(single)
    assert [step for step, _ in ddp_losses] == [step for step, _ in single_losses] == [2, 4]
    for (step, ddp_loss), (_, single_loss) in zip(ddp_losses, single_losses):
        assert abs(ddp_loss - single_loss) <= LOSS_TOLERANCE * single_loss, f"loss at step {step}"
    assert abs(summary_0["last_loss"] - single_losses[-1][1]) <= LOSS_TOLERANCE * single_losses[-1][1]


def logged_losses(workdir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(workdir / "tb"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars("train/loss")]


def weights_at_init() -> dict[str, torch.Tensor]:
    """The model as ``train`` initialises it (torch seeded by config.seed) before any step."""
    from sde.models import create_model

    config = ddp_config()
    torch.manual_seed(config.seed)
    return create_model(config).state_dict()


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, launch):
    """SIGTERM reaching only rank 1: both ranks leave the loop together, rank 0 saves, exit 0."""
    from sde import checkpoint

    workdir, out_dir = tmp_path / "ddp", tmp_path / "out"
    out_dir.mkdir()
    process = launch(out_dir, "train", workdir, 10_000)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not checkpoint.list_checkpoints(workdir / "checkpoints"):
        if process.poll() is not None or time.monotonic() > deadline:
            kill_launch(process)
            pytest.fail(f"training did not reach its first checkpoint:\n{output_of(process)}")
        time.sleep(0.2)
    os.kill(int((out_dir / "pid_1").read_text()), signal.SIGTERM)
    output = finish(process)

    (summary_0, weights_0), (summary_1, weights_1) = load_rank_results(out_dir)
    assert summary_1["interrupted"] == "SIGTERM"
    assert summary_0["interrupted"] is not None
    assert summary_0["step"] == summary_1["step"] < 10_000
    assert "saved checkpoint of step" in output
    steps = [step for step, _ in checkpoint.list_checkpoints(workdir / "checkpoints")]
    assert steps[-1] == summary_0["step"]
    saved = checkpoint.load_checkpoint(workdir / "checkpoints" / f"checkpoint_{steps[-1]}.pt")
    for key, value in saved["model"].items():
        assert torch.equal(value, weights_0["model"][key]) and torch.equal(value, weights_1["model"][key])


# ---- eval, compare and sample: the combination rules in one process --------------------
def round_robin_shares(count: int, batch_size: int, world: int) -> list[list[tuple[int, int]]]:
    """Per rank, the (first, stop) rows of batches rank, rank + world, ... (as generate deals them)."""
    batches = [(first, min(first + batch_size, count)) for first in range(0, count, batch_size)]
    return [batches[rank::world] for rank in range(world)]


def summed(parts: list[dict]) -> dict:
    """What all_reduce_arrays returns: each array summed over the parts."""
    return {key: sum(part[key] for part in parts) for key in parts[0]}


@pytest.mark.parametrize("capacity", [50, 10], ids=["kid-keeps-all", "kid-subsample"])
def test_feature_accumulators_of_any_split_add_up_to_one_process(capacity):
    from evaluation.fid import FeatureAccumulator
    from evaluation.kid import kid_sample_indices

    count, dim, seed = 23, 5, 7
    features = np.random.default_rng(0).normal(size=(count, dim))
    chosen = kid_sample_indices(count, capacity, seed)
    assert len(chosen) == min(count, capacity) and np.all(np.diff(chosen) > 0)
    if capacity < count:
        assert not np.array_equal(chosen, np.arange(capacity)), "the KID sample must be random, not a prefix"
    for world in (1, 2, 3):
        shares = [FeatureAccumulator(count, dim, capacity, seed) for _ in range(world)]
        for share, batches in zip(shares, round_robin_shares(count, 4, world)):
            for first, stop in batches:
                share.update(features[first:stop], first)
        shares[0].load_arrays(summed([share.to_arrays() for share in shares]))
        combined = shares[0].feature_set()
        assert combined.count == combined.reservoir.seen == count
        np.testing.assert_array_equal(combined.reservoir.features, features[chosen].astype(np.float32))
        np.testing.assert_allclose(combined.stats.mean(), features.mean(0), rtol=1e-12)
        np.testing.assert_allclose(combined.stats.covariance(), np.cov(features.T), rtol=1e-10)


def test_a_feature_set_missing_a_batch_is_refused():
    from evaluation.fid import FeatureAccumulator

    features = np.ones((10, 3))
    accumulator = FeatureAccumulator(10, 3, kid_capacity=4)
    accumulator.update(features[:6], 0)
    with pytest.raises(ValueError, match="has 6 of its 10 vectors"):
        accumulator.feature_set()
    with pytest.raises(ValueError, match=r"vectors 8\.\.11 are outside the set of 10"):
        accumulator.update(features[:4], 8)


def test_classifier_sums_of_shares_equal_one_process():
    from evaluation import ClassifierMetrics

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    digits = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = ClassifierMetrics(network)
    whole.update(digits)
    shares = [ClassifierMetrics(network) for _ in range(2)]
    shares[0].update(digits[:5])
    shares[1].update(digits[5:])
    shares[0].load_arrays(summed([share.to_arrays() for share in shares]))
    combined, expected = shares[0].result(), whole.result()
    assert combined["num_images"] == 12 and combined["class_histogram"] == expected["class_histogram"]
    for key in ("mean_confidence", "mean_entropy", "histogram_tv_from_uniform"):
        assert combined[key] == pytest.approx(expected[key], rel=1e-12)


def test_npz_rows_stream_into_a_file_numpy_reads(tmp_path):
    from sde.modes.sample import write_npz_rows

    array = np.random.default_rng(0).integers(0, 256, size=(7, 1, 4, 4), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    with open(path, "wb") as handle:
        write_npz_rows(handle, "images", array.shape, np.uint8, (array[i:i + 3] for i in range(0, 7, 3)))
    with np.load(path, allow_pickle=False) as saved:
        assert list(saved) == ["images"]
        np.testing.assert_array_equal(saved["images"], array)
    with open(tmp_path / "short.npz", "wb") as handle, pytest.raises(ValueError, match="got 6 of its 7 rows"):
        write_npz_rows(handle, "images", array.shape, np.uint8, [array[:6]])


# ---- eval, compare and sample under torchrun ----------------------------------------------
def copy_of_run(run: Path, destination: Path) -> Path:
    """A fresh workdir holding only the checkpoints of ``run`` (no cached statistics)."""
    shutil.copytree(run / "checkpoints", destination / "checkpoints")
    return destination


@pytest.mark.slow
def test_eval_compare_and_sample_on_two_ranks_equal_one_process(tmp_path, tiny_run, launch, monkeypatch):
    import evaluation
    from evaluation import FeatureSet

    monkeypatch.setattr(evaluation, "InceptionFeatures", PooledPixels)
    _, trained = tiny_run
    ddp, single = copy_of_run(trained, tmp_path / "ddp"), copy_of_run(trained, tmp_path / "single")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = launch(out_dir, "evaluate", ddp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same float operations in the same order
    try:
        expected = json.loads(json.dumps(run_modes(single), default=str))  # meanwhile, one process
    finally:
        torch.set_num_threads(threads)
    finish(process)

    results = [json.loads((out_dir / f"results_{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert results[1] == {"eval": {}, "compare": {}, "sample": {}}, "rank 1 reported"
    report, reference = results[0]["eval"], expected["eval"]
    # per-image values assembled exactly: mean and standard error bit for bit
    assert report["heldout_loss"] == reference["heldout_loss"]
    for key in ("bpd_ode", "bpd_elbo"):
        assert report[key] == reference[key], key
    quality, expected_quality = report["samples"], reference["samples"]
    assert quality["processes"] == 2 and expected_quality["processes"] == 1
    for key in ("nfe", "num_samples", "num_generated", "num_reference", "kid", "kid_std"):
        assert quality[key] == expected_quality[key], key
    assert quality["fid"] == pytest.approx(expected_quality["fid"], rel=1e-9)
    classifier, expected_classifier = quality["classifier"], expected_quality["classifier"]
    assert classifier["num_images"] == 20 and classifier["class_histogram"] == expected_classifier["class_histogram"]
    for key in ("mean_confidence", "mean_entropy"):  # float64 sums added in another order
        assert classifier[key] == pytest.approx(expected_classifier[key], rel=1e-12), key
    [compared], [expected_compared] = results[0]["compare"]["results"], expected["compare"]["results"]
    assert compared["kid"] == expected_compared["kid"] and compared["nfe"] == expected_compared["nfe"]
    assert compared["fid"] == pytest.approx(expected_compared["fid"], rel=1e-9)
    assert results[0]["sample"]["nfe_per_sample"] == expected["sample"]["nfe_per_sample"]

    # the reference statistics the ranks computed together
    [cache] = (ddp / "fid_cache").glob("inception_mnist_test_30_*.npz")
    computed, expected_set = FeatureSet.load(cache), FeatureSet.load(single / "fid_cache" / cache.name)
    assert computed.count == expected_set.count == 30
    np.testing.assert_array_equal(computed.reservoir.features, expected_set.reservoir.features)
    np.testing.assert_allclose(computed.stats.outer_sum, expected_set.stats.outer_sum, rtol=1e-13)
    np.testing.assert_allclose(computed.stats.feature_sum, expected_set.stats.feature_sum, rtol=1e-13)
    # sample mode: every rank's batches in order, the same file
    name = "ddim_3steps_seed0"
    with np.load(ddp / "samples" / f"{name}.npz") as saved, np.load(single / "samples" / f"{name}.npz") as alone:
        assert saved["images"].shape == (13, 1, 28, 28)
        np.testing.assert_array_equal(saved["images"], alone["images"])
    # rank 0 alone wrote: one event file, one of each output
    assert len(list((ddp / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (ddp / "samples").iterdir()) == sorted(p.name for p in (single / "samples").iterdir())
    assert {"report_step6.json", "samples_step6.png"} <= {p.name for p in (ddp / "eval").iterdir()}
    assert [p.name for p in (ddp / "fid_cache").glob("*.npz")] == [cache.name]


if __name__ == "__main__":
    worker_out_dir, worker_task, *worker_args = sys.argv[1:]
    (Path(worker_out_dir) / f"pid_{os.environ['RANK']}").write_text(str(os.getpid()))
    if worker_task == "train":
        run_worker(Path(worker_args[0]), Path(worker_out_dir), int(worker_args[1]))
    else:
        run_evaluation_worker(Path(worker_args[0]), Path(worker_out_dir))
