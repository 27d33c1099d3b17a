"""Experiments: one module per study (config dataclass + presets + ``run``), plus the framework.

``EXPERIMENTS`` maps the names that ``diffcore run <name>`` accepts to their modules; each module
defines ``CONFIG_CLASS``, ``PRESETS`` (name -> config factory) and
``run(config, out, *, hooks=None, device="auto", progress=True) -> dict``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS = {
    "reproducibility": "diffcore.experiments.reproducibility",
    "demo": "diffcore.experiments.demo",
    "hidden-gaussian": "diffcore.experiments.hidden_gaussian",
    "molrg": "diffcore.experiments.molrg",
    "pfd": "diffcore.experiments.pfd",
    "loco-edit": "diffcore.experiments.loco_edit",
    "cfg": "diffcore.experiments.cfg",
    "watermark": "diffcore.experiments.watermark",
    "representation": "diffcore.experiments.representation",
    "multistage": "diffcore.experiments.multistage",
    "dynamics": "diffcore.experiments.dynamics",
    "locality": "diffcore.experiments.locality",
    "unlearning": "diffcore.experiments.unlearning",
}


def experiment(name: str) -> ModuleType:
    """The module of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


__all__ = ["EXPERIMENTS", "experiment"]
