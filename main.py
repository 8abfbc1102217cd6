"""Entry point: ``python main.py --config configs/mnist_vp.py --mode train [--workdir W]``.

``MODES`` is the table of modes: each is a module of ``sde/modes`` whose ``run(config,
workdir)`` checks the config (its own keys and the shared ones) before any work, then runs.
Any config key can be overridden on the command line, e.g. ``--config.training.n_iters=200``.
A bad config or input -- including a bad flag or an override of a key the config does not
have -- ends the run with one line on stderr and exit code 2, before any expensive work.
"""
import importlib
import importlib.util
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

#: mode -> the module of ``sde/modes`` that runs it.
MODES = {
    "train": "sde.modes.train",
    "sample": "sde.modes.sample",
    "eval": "sde.modes.evaluate",
    "compare": "sde.modes.compare",
    "export": "sde.modes.export",
    "align_steps": "sde.modes.align_steps",
    "latent": "sde.modes.latent",
    "inverse": "sde.modes.inverse",
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file name>).")
flags.mark_flag_as_required("config")

#: Exit code of every bad-input error (as for a command-line usage error).
BAD_INPUT_EXIT_CODE = 2
#: Exit code of a run that failed on its own (training diverged): the input was valid.
RUN_FAILED_EXIT_CODE = 1


def fail(message: str, code: int = BAD_INPUT_EXIT_CODE) -> None:
    """End the run: ``error: <message>`` as one stderr line, exit code 2 (bad input) or ``code``."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def os_error_message(error: OSError) -> str:
    """An operating-system error as one line naming the path (a file that cannot be read, a
    folder that cannot be written, a full disk)."""
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    reason = error.strerror or str(error) or type(error).__name__
    return f"{where}: {reason}" if where else reason


def _terminate(signum, frame) -> None:
    """SIGTERM as an exception, so that the ``finally`` of each write removes its temporary
    file (``sde.checkpoint.atomic_write``); training handles SIGTERM itself while it trains."""
    raise SystemExit(128 + signum)


def _config_file(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (without a ``:argument`` suffix), if given."""
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1].split(":", 1)[0]
    return None


def _unknown_override(argv: list[str]) -> str | None:
    """Describe the first ``--config.<key>=...`` whose key the config file does not define."""
    path = _config_file(argv)
    if path is None or not Path(path).is_file():
        return None
    spec = importlib.util.spec_from_file_location("_config_of_bad_override", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            parent = ".".join(["config", *parts[:depth]])
            if not isinstance(node, ConfigDict):
                return f"--config.{key}: {parent} is a value, not a group of keys"
            if part not in node:
                return (f"--config.{key}: unknown config key {part!r} in {parent}; "
                        f"accepted: {', '.join(sorted(node.keys()))}")
            node = node[part]
    return None


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def usage() -> str:
    """What ``--help`` prints: the command, the modes, the configs and where every key is."""
    from configs.default import get_default_config

    configs = sorted(path.name for path in (Path(__file__).parent / "configs").glob("*.py")
                     if path.stem not in ("__init__", "default"))
    groups = [name for name, value in get_default_config().items() if hasattr(value, "keys")]
    paragraphs = [
        f"--mode: {' | '.join(MODES)} (default: train). --workdir: the run directory (default: "
        f"runs/<config name>). --config: a config file, one of {', '.join(configs)}.",
        "Any config key can be set on the command line, e.g. --config.training.n_iters=200 or "
        f"--config.sampling.method=heun. The groups of keys are {', '.join(groups)}; configs/default.py "
        "lists every key with its default and a comment, and README.md says what each mode does and writes.",
        "Example: python main.py --config configs/mnist_quick.py --mode train",
    ]
    return "\n\n".join(["usage: python main.py --config configs/<name>.py [--mode MODE] [--workdir DIR] "
                        "[--config.<group>.<key>=VALUE ...]",
                        *(textwrap.fill(paragraph, 92) for paragraph in paragraphs)])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config override reported like any bad input;
    ``--help`` prints ``usage()`` and exits with 0."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(usage(), flush=True)
        sys.exit(0)
    config_file = _config_file(argv)
    if config_file is not None and not Path(config_file).is_file():
        fail(f"--config {config_file}: no such config file")
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        if os.environ.get("SDE_TRACEBACK"):
            raise
        message = _unknown_override(argv) if isinstance(error, (AttributeError, KeyError)) else None
        fail(message or f"bad command line: {str(error).splitlines()[0] if str(error) else type(error).__name__}")


def run_mode(mode: str, config, workdir: str) -> dict:
    """Run ``mode`` (a key of ``MODES``) on ``config`` in ``workdir``; returns its summary."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    from sde import progress

    progress.set_quiet(config.get("quiet", False) is True)
    return importlib.import_module(MODES[mode]).run(config, workdir)


def main(argv):
    del argv
    from sde.configuration import USER_ERRORS
    from sde.divergence import TrainingDiverged

    # absl shows INFO records; matplotlib's (e.g. "generated new fontManager" on a first run)
    # are not the toolkit's to show
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    workdir = FLAGS.workdir or str(Path("runs") / Path(FLAGS["config"].config_filename).stem)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_mode(FLAGS.mode, FLAGS.config, workdir)
    except USER_ERRORS as error:
        if os.environ.get("SDE_TRACEBACK"):
            raise
        fail(str(error))
    except TrainingDiverged as error:
        if os.environ.get("SDE_TRACEBACK"):
            raise
        fail(str(error), RUN_FAILED_EXIT_CODE)
    except OSError as error:  # after USER_ERRORS, which hold FileNotFoundError
        if os.environ.get("SDE_TRACEBACK"):
            raise
        fail(os_error_message(error))
    if result:
        print(result.get("message", ""), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
