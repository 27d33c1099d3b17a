"""What the studies take from the rest of the stack, as one injectable object.

A study calls the sampler, trainer, models, data and k-NN only through a :class:`StudyHooks`;
:func:`default_hooks` builds the real one from :mod:`diffcore.experiments._stack`, and tests inject
closed-form stand-ins. This module sits below every study (no study imports another study).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class StudyHooks:
    """What a study needs from the rest of the stack (injectable for tests).

    - ``load_dataset(name, root) -> images [P, C, H, W]`` in [-1, 1]
    - ``subset(images, n, seed) -> (images [n, ...], indices [n])``, nested in n
    - ``train(images, spec, out_dir, work_dir, device=, progress=) -> dict`` writes a model to out_dir
    - ``load(model_dir, device=) -> D(x, sigma)``
    - ``sample(denoiser, seeds, shape, steps=, solver=, sigma_min=, sigma_max=, device=, progress=)``
      ``-> [len(seeds), *shape]``
    - ``empirical_denoiser(train_images) -> D(x, sigma)``
    - ``knn(queries [B, F], train [N, F], k) -> (distances, indices)``
    - ``noise_from_seeds(seeds, shape, device, dtype) -> [B, *shape]`` (figures of the noise)
    - ``train_ensemble(images_list, specs, work_dirs, device=, progress=) -> [dict]`` (optional)
      trains the models of ``specs`` (one architecture) as one stacked ensemble in their work
      folders up to their final step, so that ``train`` with the same spec and work folder only
      finishes each; returns each member's metadata. None: every model trains alone.
    """

    load_dataset: Callable
    subset: Callable
    train: Callable
    load: Callable
    sample: Callable
    empirical_denoiser: Callable
    knn: Callable
    noise_from_seeds: Callable
    train_ensemble: Callable | None = None


def default_hooks() -> StudyHooks:
    """The studies' hooks on the real stack (:mod:`diffcore.experiments._stack`)."""
    from diffcore import sampler
    from diffcore.denoisers import EmpiricalDenoiser
    from diffcore.experiments import _stack

    return StudyHooks(
        load_dataset=_stack.load_dataset,
        subset=_stack.subset,
        train=_stack.train_model,
        load=_stack.load_model,
        sample=_stack.sample,
        empirical_denoiser=EmpiricalDenoiser,
        knn=_stack.knn,
        noise_from_seeds=sampler.noise_from_seeds,
        train_ensemble=_stack.train_ensemble,
    )
