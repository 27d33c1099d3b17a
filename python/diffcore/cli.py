"""The ``diffcore`` command: a thin shell over importable functions (library first, CLI second).

    diffcore info                      build, backends usable here, DIFFCORE_* variables
    diffcore demo [--out DIR]          the empirical denoiser of the digits memorizes (seconds)
    diffcore run EXPERIMENT --preset P --out DIR [--set key=value ...]
    diffcore train ...                 training (arguments of diffcore.train)

Library code logs; this module prints.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from diffcore import _env, _folder

# user errors, shown as one line (ConfigError is a ValueError); anything else keeps its traceback
# FloatingPointError: a run that diverged (a setting such as the learning rate), not a bug
ERRORS_SHOWN_PLAINLY = (ValueError, KeyError, OSError, MemoryError, FloatingPointError)


def _build_parser() -> argparse.ArgumentParser:
    from diffcore import __version__
    from diffcore.experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(
        prog="diffcore",
        description="diffcore: kernels and experiments for the science of diffusion-model generalization",
    )
    parser.add_argument("--version", action="version", version=f"diffcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="build info, backends usable here, DIFFCORE_* variables")
    info.add_argument("--json", action="store_true", help="print JSON")

    def add_run_options(p, default_preset=None):
        p.add_argument("--out", default=None, help="output folder (default: runs/<experiment>-<preset>)")
        p.add_argument(
            "--wait",
            type=float,
            default=None,
            metavar="SECONDS",
            help="wait this long for an output folder another run holds (default 0: exit; also DIFFCORE_LOCK_WAIT)",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field (repeatable); tuples as comma-separated values",
        )
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
        p.add_argument("--no-progress", action="store_true", help="no progress bars (also DIFFCORE_PROGRESS=0)")
        p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
        if default_preset is not None:
            p.add_argument("--preset", default=default_preset, help="named preset of the config")

    run = sub.add_parser(
        "run",
        help="run (or resume) an experiment",
        description="Run an experiment into --out; rerunning the same command resumes it.",
    )
    run.add_argument("experiment", choices=sorted(EXPERIMENTS))
    add_run_options(run, default_preset="quick")
    run.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    run.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="process I (0 .. N-1) of N sharing the run (a job array); afterwards a run "
        "without --shard writes the results (studies that spread their units)",
    )

    demo = sub.add_parser("demo", help="denoise noise with the empirical denoiser of the digits (seconds)")
    add_run_options(demo, default_preset="default")

    train = sub.add_parser("train", help="train a model (arguments of diffcore.train)", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def info(as_json: bool = False) -> dict:
    """What this installation can do: build, devices, backends, environment."""
    import torch

    import diffcore
    from diffcore import _backend

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    backends = {
        str(dev): {b: (_backend.why_unusable(b, dev) or "usable") for b in _backend.BACKENDS} for dev in devices
    }
    variables = {
        name: {"value": os.environ.get(name), "meaning": meaning}
        for name, meaning in {**_env.RUNTIME_VARIABLES, **_env.BUILD_VARIABLES, **_env.BENCH_VARIABLES}.items()
    }
    from diffcore.experiments import EXPERIMENTS, experiment

    experiments = {name: sorted(experiment(name).PRESETS) for name in EXPERIMENTS}
    return {
        "diffcore": diffcore.__version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "build": diffcore.build_info(),
        "backends": backends,
        "cpu_screen": _cpu_screen_info(),
        "environment": variables,
        "experiments": experiments,
    }


def _cpu_screen_info() -> dict:
    """The CPU screening precision of knn / empirical_denoise and why (or the error of a bad
    DIFFCORE_CPU_SCREEN: info must still print)."""
    from diffcore import _cpu_caps

    try:
        return _cpu_caps.screen_choice().as_dict()
    except ValueError as exc:
        return {"precision": None, "reason": str(exc), "caps": _cpu_caps.cpu_caps().as_dict()}


def _print_info(data: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    print(f"diffcore {data['diffcore']} (torch {data['torch']}, CUDA available: {data['cuda_available']})")
    build = data["build"]
    if build:
        print("build: " + ", ".join(f"{k}={v}" for k, v in build.items()))
    else:
        print("build: diffcore._C is not built")
    for device, table in data["backends"].items():
        print(f"backends on {device}:")
        for name, status in table.items():
            print(f"  {name:10s} {status}")
    screen = data["cpu_screen"]
    print(f"CPU screening precision, empirical_denoise: {screen['precision']} ({screen['reason']})")
    if screen.get("knn_precision"):
        print(f"CPU screening precision, knn: {screen['knn_precision']} ({screen['knn_reason']})")
    print("experiments (diffcore run NAME --preset P):")
    for name, presets in data["experiments"].items():
        print(f"  {name:16s} presets: {', '.join(presets)}")
    print("environment:")
    for name, entry in data["environment"].items():
        value = entry["value"] if entry["value"] is not None else "(unset)"
        print(f"  {name:20s} {value:10s} {entry['meaning']}")


def _run_experiment(name: str, args) -> int:
    from diffcore.experiments import experiment
    from diffcore.experiments.base import config_from_preset, json_dumps

    module = experiment(name)
    config = config_from_preset(module.PRESETS, args.preset, args.overrides)
    if getattr(args, "show_config", False):
        print(json_dumps(config), end="")
        return 0
    out = args.out if args.out is not None else str(Path("runs") / f"{name}-{args.preset}")
    if args.wait is not None:
        os.environ[_folder.LOCK_WAIT_VAR] = str(args.wait)
    _set_shard(getattr(args, "shard", None))
    print(f"diffcore: {name} (preset {args.preset}) -> {out}")
    results = module.run(config, out, device=args.device, progress=not args.no_progress)
    if not results:
        print("diffcore: this process's share is done; the results are written by rank 0 or by a run without --shard")
        return 0
    _print_summary(module, results, Path(out))
    return 0


def _set_shard(shard: str | None) -> None:
    """``--shard I/N`` as DIFFCORE_SHARD (a study that does not spread its units refuses it when it runs)."""
    from diffcore.experiments.base import SHARD_VAR, parse_shard

    if shard is not None:
        parse_shard(shard)
        os.environ[SHARD_VAR] = shard


def _print_summary(module, results: dict, out: Path) -> None:
    """The study's own summary lines (its ``STUDY.summary``), or where the results are."""
    summary = module.STUDY.summary
    for line in summary(results, out) if summary is not None else [f"results: {out / 'results.json'}"]:
        print(line)


def _train(argv: list[str]) -> int:
    from diffcore.train import main_train

    return int(main_train(argv) or 0)


def _error_line(exc: BaseException) -> str:
    """One line for an error: its message, or for an OS error its file and reason."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, BrokenProcessPool):
        return (
            "a worker process died (killed, or out of memory) before finishing its unit; finished "
            "units are kept: rerun the same command to resume"
        )
    if isinstance(exc, MemoryError):
        return f"out of memory: {exc}" if str(exc) else "out of memory"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _env.tune_allocator()
    if argv and argv[0] == "train":  # everything after "train" belongs to diffcore.train's parser
        _configure_logging(False)
        job = functools.partial(_train, argv[1:])
    else:
        parser = _build_parser()
        parsed = parser.parse_args(argv)
        if parsed.command == "info":
            _print_info(info(), parsed.json)
            return 0
        _configure_logging(parsed.quiet)
        job = functools.partial(_run_experiment, "demo" if parsed.command == "demo" else parsed.experiment, parsed)
    from diffcore.experiments.base import UnitError
    from diffcore.train.checkpoint import CheckpointError

    try:
        return job()
    except (*ERRORS_SHOWN_PLAINLY, _folder.FolderError, UnitError, CheckpointError, BrokenProcessPool) as exc:
        print(f"diffcore: error: {_error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
