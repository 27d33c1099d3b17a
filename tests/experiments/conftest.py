"""Fixtures of the experiments tests: stand-in hooks built on closed-form denoisers.

The stand-in "model" of width w trained on N images has a capacity of 16 w images: at N <= 16 w it
is the empirical denoiser of its N images (it memorizes), above it is the denoiser of the Gaussian
fitted to them (it generalizes; docs/papers.md section 3), so wider models memorize up to larger N, like
the trained UNets of the paper. The training seed scales the fitted covariance a little. A checkpoint
kept before half of the training steps (``keep_steps``) is the Gaussian one whatever N, except at
step 1, where it is untrained (it outputs zeros).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffcore.data import load_digits
from diffcore.experiments.hooks import StudyHooks

_spec = importlib.util.spec_from_file_location("standins", Path(__file__).parents[1] / "metrics" / "standins.py")
standins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standins)


CAPACITY_PER_WIDTH = 16


def subset(images, n, seed):
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    idx = order[:n]
    return images[idx], idx


class StandInStack:
    """Closed-form stand-ins for train / load / sample, counting the calls."""

    def __init__(self, fail_on_train_call: int | None = None):
        self.calls = {"train": 0, "load": 0, "sample": 0}
        self.fail_on_train_call = fail_on_train_call
        self.pool = load_digits()[0]

    def load_dataset(self, name, root=""):
        assert name == "digits"
        return self.pool

    def train(self, images, spec, out_dir, work_dir, device="cpu", progress=True):
        self.calls["train"] += 1
        if self.fail_on_train_call is not None and self.calls["train"] == self.fail_on_train_call:
            (Path(out_dir) / "model.json").write_text("{half")  # a half-written file
            raise KeyboardInterrupt("simulated kill during training")
        (work_dir / "checkpoint.txt").write_text("step 10")
        # the subset's images: a nested subset, or the positions a spec lists (a half, subsets=disjoint)
        idx = (
            torch.tensor(spec["indices"]) if "indices" in spec else subset(self.pool, spec["n"], spec["subset_seed"])[1]
        )
        (Path(out_dir) / "model.json").write_text(json.dumps({"indices": idx.tolist(), **spec}))
        for step in spec.get("keep_steps", ()):  # checkpoints, as _stack.train_model keeps them
            folder = Path(out_dir) / "steps" / f"step_{step:09d}"
            folder.mkdir(parents=True)
            (folder / "model.json").write_text(json.dumps({"indices": idx.tolist(), **spec, "step": step}))
        return {"final_loss": 0.1}

    def load(self, model_dir, device="cpu"):
        self.calls["load"] += 1
        model = json.loads((Path(model_dir) / "model.json").read_text())
        train = self.pool[torch.tensor(model["indices"])]
        # a checkpoint at step 1 is untrained (outputs zeros); one in the first half of training has
        # not memorized yet (the Gaussian structure comes first, docs/papers.md section 3)
        if model.get("step") == 1:
            return lambda x, sigma: torch.zeros_like(x)
        early = 2 * model.get("step", model["train_steps"]) < model["train_steps"]
        if model["n"] <= CAPACITY_PER_WIDTH * model["width"] and not early:
            return standins.empirical_denoiser(train)
        return standins.fitted_gaussian_denoiser(train, scale=1.0 + 0.02 * model["seed"])

    def sample(
        self,
        denoiser,
        seeds,
        shape,
        steps=18,
        solver="heun",
        sigma_min=0.002,
        sigma_max=80.0,
        device="cpu",
        progress=True,
    ):
        self.calls["sample"] += 1
        z = standins.noise_from_seeds(seeds, shape, dtype=torch.float64)
        sigmas = standins.karras_sigmas(steps, sigma_min, sigma_max)
        return standins.heun_sampler(denoiser, z * sigmas[0], sigmas)

    def hooks(self) -> StudyHooks:
        return StudyHooks(
            load_dataset=self.load_dataset,
            subset=subset,
            train=self.train,
            load=self.load,
            sample=self.sample,
            empirical_denoiser=standins.empirical_denoiser,
            knn=standins.knn,
            noise_from_seeds=standins.noise_from_seeds,
        )


@pytest.fixture(scope="session")
def stand_in_stack():
    return StandInStack


@pytest.fixture(scope="module")
def tiny_run(request, tmp_path_factory):
    """``(out, results)``: the test module's ``study`` run once at its tiny preset (default hooks, no
    progress bars). A module that runs its study otherwise defines its own ``tiny_run``."""
    study = request.module.study
    out = tmp_path_factory.mktemp(study.NAME)
    return out, study.run_preset("tiny", out, progress=False)
