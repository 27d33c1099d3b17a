"""diffcore.denoisers: closed-form denoisers speaking the ``D(x, sigma)`` contract.

- :class:`GaussianDenoiser` (docs/papers.md section 3): fitted mean/covariance, exact PF-ODE map, Jacobian W(sigma).
- :class:`MoLRGDenoiser` (docs/papers.md section 4): mixture of low-rank Gaussians, posterior weights, log-density.
- :class:`ClassGaussians` (docs/papers.md section 8): per-class Gaussians, the exact linear split of CFG, CPCs.
- :class:`EmpiricalDenoiser`: the training set's optimal denoiser, on ``diffcore.ops.empirical_denoise``.
- :class:`GaussianMixtureDenoiser` (full-rank Gaussians per class) and :class:`ScaledMoLRGDenoiser`
  (:class:`MoLRGDenoiser` at a given data scale): the closed-form mixtures of ``mixture.py``.
"""

from diffcore.denoisers.class_gaussian import ClassGaussians, LinearSplit
from diffcore.denoisers.empirical import EmpiricalDenoiser
from diffcore.denoisers.gaussian import GaussianDenoiser
from diffcore.denoisers.mixture import GaussianMixtureDenoiser, ScaledMoLRGDenoiser
from diffcore.denoisers.molrg import MoLRGDenoiser

__all__ = [
    "ClassGaussians",
    "LinearSplit",
    "EmpiricalDenoiser",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "MoLRGDenoiser",
    "ScaledMoLRGDenoiser",
]
