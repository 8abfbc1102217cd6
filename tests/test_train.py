"""Training end to end on tiny configs: outputs, resume, exact reproducibility, toy loss."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from conftest import make_tiny_config

from configs import toy_vp
from sde import checkpoint
from sde.models import create_model
from sde.modes.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**training):
    return make_tiny_config(**training)


def test_train_writes_checkpoints_tensorboard_and_samples(tiny_run):
    config, tmp_path = tiny_run
    steps = [step for step, _ in checkpoint.list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [3, 6]
    state = checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint_6.pt")
    assert set(state) == {"model", "ema", "optimizer", "step", "data", "rng", "divergence", "wall_time_s"}
    assert json.loads((tmp_path / "config.json").read_text())["training"]["n_iters"] == 6
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [event.step for event in losses] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(event.value)) for event in losses)
    assert "samples" in accumulator.Tags()["images"]
    assert (tmp_path / "samples" / "train_step_6.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = tiny_config()
    straight.model.dropout = 0.1  # dropout draws from the global RNG: resume must restore it
    train(straight, tmp_path / "straight")

    interrupted = tiny_config()
    interrupted.model.dropout = 0.1
    interrupted.training.n_iters = 3
    train(interrupted, tmp_path / "resumed")
    resumed = tiny_config()
    resumed.model.dropout = 0.1
    summary = train(resumed, tmp_path / "resumed")
    assert summary["step"] == 6

    a = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoints" / "checkpoint_6.pt")
    b = checkpoint.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "checkpoint_6.pt")
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert a["data"] == b["data"]


def test_architecture_mismatch_is_named(tiny_run, tmp_path):
    """With the run's config.json the changed key is named before anything is built; without
    it (checkpoints copied alone) the checkpoint's mismatched tensors are."""
    _, workdir = tiny_run
    wider = tiny_config(n_iters=9)
    wider.model.nf = 16
    with pytest.raises(ValueError, match=r"trained with another config: model\.nf=16 \(the run: 8\)"):
        train(wider, workdir)
    shutil.copytree(workdir / "checkpoints", tmp_path / "copy" / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError, match="does not match the configured model"):
        train(wider, tmp_path / "copy")


def test_init_weights_start_a_fine_tune_from_exported_or_checkpoint_weights(tiny_run, tmp_path):
    config, workdir = tiny_run
    source = workdir / "checkpoints" / "checkpoint_6.pt"
    ema = checkpoint.load_checkpoint(source)["ema"]
    exported = tmp_path / "ema.safetensors"
    subject = create_model(config)
    subject.load_state_dict(ema)
    checkpoint.export_safetensors(subject, exported)
    for weights in (source, exported):
        fine_tune = tiny_config(n_iters=1, snapshot_freq=1, init_weights=str(weights), lr=1e-12)
        summary = train(fine_tune, tmp_path / weights.suffix[1:])
        assert summary["step"] == 1
        state = checkpoint.load_checkpoint(tmp_path / weights.suffix[1:] / "checkpoints" / "checkpoint_1.pt")
        for key, value in ema.items():  # one step at lr 1e-12 leaves the weights where they began
            torch.testing.assert_close(state["model"][key], value, rtol=0, atol=1e-8, msg=key)
        # the optimizer starts fresh: one Adam step, not the source run's six
        assert all(s["step"] == 1 for s in state["optimizer"]["state"].values())
    # a workdir with a checkpoint resumes it; init_weights only seeds fresh runs
    resumed = tiny_config(n_iters=2, snapshot_freq=1, init_weights="does/not/matter.pt")
    assert train(resumed, tmp_path / "pt")["step"] == 2


def test_non_finite_loss_stops_without_touching_the_good_checkpoint(tmp_path):
    train(tiny_config(), tmp_path)
    before = (tmp_path / "checkpoints" / "checkpoint_6.pt").read_bytes()
    broken = tiny_config(n_iters=12, lr=float("inf"), max_bad_steps=2)
    with pytest.raises(TrainingDiverged, match="non-finite steps in a row"):
        train(broken, tmp_path)
    assert (tmp_path / "checkpoints" / "checkpoint_6.pt").read_bytes() == before


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/tiny.py", "--mode", "train",
         "--workdir", str(tmp_path), "--config.sde.name=vpp"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown sde.name 'vpp'; accepted: vp, subvp, ve"]


@pytest.mark.slow
def test_toy_spiral_loss_drops(tmp_path):
    config = toy_vp.get_config()
    config.model.nf, config.model.num_layers = 128, 3  # a small MLP, whose loss falls over the 600 steps
    config.training.n_iters = 600
    config.training.log_freq = 50
    config.training.snapshot_freq = 600
    config.training.sample_freq = 600
    train(config, tmp_path)
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    start, end = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    assert end < 0.75 * start, f"loss did not drop clearly: {start:.3f} -> {end:.3f}"


def test_ema_decay_ramps_up_so_the_initial_weights_fade():
    """d_n = min(rate, (1+n)/(10+n)): after 1000 updates toward a fixed target the weight
    left on the initial value is prod d_n, far below the rate**1000 = 0.37 of a fixed decay."""
    from sde.modes.train import EMA

    start, target = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(start.weight)
    torch.nn.init.ones_(target.weight)
    ema = EMA(start, rate=0.999)
    assert ema.decay(0) == pytest.approx(0.1) and ema.decay(10**6) == 0.999
    for n in range(1000):
        ema.update(target, n)
    initial_weight = 1.0 - ema.model.weight.item()
    expected = 1.0
    for n in range(1000):
        expected *= ema.decay(n)
    assert expected < 1e-20
    assert abs(initial_weight - expected) < 1e-6  # float32 resolution near 1


def test_learning_rate_warms_up_then_holds_or_follows_a_half_cosine_to_zero():
    """lr_t = lr (t+1)/warmup during the warm-up; then lr, or lr (1 + cos(pi p))/2 with p the
    fraction of the post-warm-up steps done (SGDR's eq. 5, one cycle, floor 0)."""
    import math

    from sde.modes.train import check, learning_rate

    config = tiny_config()
    train_cfg = config.training
    train_cfg.lr, train_cfg.warmup, train_cfg.n_iters = 1e-3, 10, 110
    assert [learning_rate(config, t) for t in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert {learning_rate(config, t) for t in (10, 60, 109)} == {1e-3}
    train_cfg.lr_schedule = "cosine"
    assert learning_rate(config, 4) == pytest.approx(5e-4)  # the warm-up is the same
    assert learning_rate(config, 10) == pytest.approx(1e-3)
    assert learning_rate(config, 60) == pytest.approx(5e-4)  # halfway: cos(pi/2) = 0
    assert learning_rate(config, 35) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert 0 < learning_rate(config, 109) < 1e-6 and learning_rate(config, 110) == 0
    rates = [learning_rate(config, t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    train_cfg.lr_schedule = "linear"
    with pytest.raises(ValueError, match=r"training.lr_schedule must be one of constant, cosine, got 'linear'"):
        check(config)


def test_p2_weighting_is_refused_where_it_has_no_meaning():
    from sde.modes.train import check

    config = tiny_config()
    config.training.p2_gamma = 1.0
    check(config)  # the plain continuous loss: fine
    config.training.likelihood_weighting = True
    with pytest.raises(ValueError, match="training.p2_gamma reweights the plain continuous loss"):
        check(config)
    config.training.likelihood_weighting, config.training.continuous = False, False
    with pytest.raises(ValueError, match="training.p2_gamma reweights the plain continuous loss"):
        check(config)


def test_amp_takes_none_bf16_fp16_and_the_booleans_of_older_configs():
    from sde.modes.train import check, precision

    assert [precision(value) for value in (False, True, None, "none", "bf16", "fp16")] == \
        ["none", "bf16", "none", "none", "bf16", "fp16"]
    config = tiny_config()
    config.training.amp = "fp8"
    with pytest.raises(ValueError, match=r"training.amp must be one of none, bf16, fp16 .*got 'fp8'"):
        check(config)
    config.training.amp = True  # a config written before the precisions had names
    check(config)


def test_fp16_training_scales_the_loss_and_resumes_with_the_scalers_state(tmp_path):
    """fp16 autocast trains with a gradient scaler (Micikevicius et al. 2018) whose state is part
    of the checkpoint: a resumed run continues its growth count instead of starting over."""
    first = tiny_config(amp="fp16", n_iters=3)
    first.training.grad_clip = 0.0
    summary = train(first, tmp_path)
    scaler = checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint_3.pt")["scaler"]
    assert summary["step"] == 3 and scaler["scale"] > 0
    taken = 3 - summary["overflow_steps"]
    assert scaler["_growth_tracker"] == taken
    resumed = tiny_config(amp="fp16", n_iters=6)
    resumed.training.grad_clip = 0.0
    summary = train(resumed, tmp_path)
    final = checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint_6.pt")
    assert summary["step"] == 6 and torch.isfinite(torch.tensor(summary["last_loss"]))
    if summary["overflow_steps"] == 0:  # no overflow since the resume: the count went on from 3
        assert final["scaler"]["_growth_tracker"] == taken + 3
    assert json.loads((tmp_path / "train_summary.json").read_text())["environment"]["autocast"] == "fp16"


@pytest.mark.slow
def test_compiled_training_runs_and_matches_eager_training(tmp_path, monkeypatch):
    """training.compile wraps the training network in torch.compile, and the compiled run
    trains as the eager one does. The graphs are captured (TorchDynamo) and differentiated
    (AOTAutograd) as on any backend, but run by the aot_eager backend: inductor's C++ code
    generation is torch's, not ours, and costs minutes of compiler time on a CPU."""
    compiled, original_compile = [], torch.compile

    def compile_for_test(module, **options):
        compiled.append(module)
        return original_compile(module, backend="aot_eager", **options)

    eager = train(tiny_config(n_iters=2), tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", compile_for_test)
    summary = train(tiny_config(compile=True, n_iters=2), tmp_path / "compiled")
    assert len(compiled) == 1 and summary["step"] == 2
    assert summary["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-4)
