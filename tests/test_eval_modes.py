"""``--mode eval`` and ``--mode compare`` end to end on a tiny checkpoint (slow: real Inception)."""
import csv
import json

import pytest

from sde.modes.evaluate import evaluate

pytestmark = pytest.mark.slow


def small_eval_config(config):
    config = config.copy_and_resolve_references()
    config.eval.num_samples = 8
    config.eval.batch_size = 8
    config.eval.reference_num_images = 16
    config.eval.bpd_num_images = 4
    config.sampling.batch_size = 8
    return config


def test_eval_mode_writes_report(tiny_run, user_cache):
    config, workdir = tiny_run
    report = evaluate(small_eval_config(config), workdir)
    saved = json.loads((workdir / "eval" / "report_step6.json").read_text())
    assert saved["bpd_ode"]["mean"] > 0 and saved["bpd_elbo"]["mean"] > 0
    assert saved["samples"]["num_samples"] == 8 and saved["samples"]["fid"] > 0
    assert sum(saved["samples"]["classifier"]["class_histogram"]) == 8
    assert "FID" in report["message"] and "bits/dim (ODE)" in report["message"]
    assert saved["environment"]["device"] == "cpu" and saved["environment"]["processes"] == 1
    assert any(p.name.startswith("inception_mnist_test_16_") for p in user_cache.iterdir())
    assert not any(p.name.startswith("inception_") for p in (workdir / "eval").iterdir())


def test_compare_mode_writes_tables_and_plot(tiny_run):
    from sde.modes.compare import compare

    config, workdir = tiny_run
    config = small_eval_config(config)
    config.compare.runs = ("ddim:3", "dpm_solver:3:order=2")
    config.compare.num_samples = 8
    compare(config, workdir)
    out = workdir / "compare"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["run"] for row in rows] == ["ddim:3", "dpm_solver:3:order=2"]
    assert all(float(row["fid"]) > 0 for row in rows)
    assert (out / "fid_vs_nfe.png").stat().st_size > 0 and (out / "results.md").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_samples"] == 8 and saved["environment"]["device"] == "cpu"



def test_an_unusable_cache_folder_is_refused_before_any_work(tiny_run, tmp_path):
    from sde.modes import compare as compare_mode
    from sde.modes import evaluate as evaluate_mode

    config, _ = tiny_run
    config = small_eval_config(config)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config.eval.cache_dir = str(blocker / "cache")
    for mode in (evaluate_mode, compare_mode):
        with pytest.raises(ValueError, match=r"cache .*a_file/cache cannot be created .*set eval.cache_dir"):
            mode.check(config)
    config.eval.cache_dir = str(tmp_path / "fine")
    evaluate_mode.check(config)
    assert (tmp_path / "fine").is_dir()
