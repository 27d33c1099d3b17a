"""diffcore.denoisers: closed-form denoisers speaking the ``D(x, sigma)`` contract.

- :class:`GaussianDenoiser` (PAPERS.md 3): fitted mean/covariance, exact PF-ODE map, Jacobian W(sigma).
- :class:`MoLRGDenoiser` (PAPERS.md 4): mixture of low-rank Gaussians, posterior weights, log-density.
- :class:`EmpiricalDenoiser`: the training set's optimal denoiser, on ``diffcore.ops.empirical_denoise``.
"""
from diffcore.denoisers.empirical import EmpiricalDenoiser
from diffcore.denoisers.gaussian import GaussianDenoiser
from diffcore.denoisers.molrg import MoLRGDenoiser

__all__ = ["EmpiricalDenoiser", "GaussianDenoiser", "MoLRGDenoiser"]
