"""Measures of a trained class-conditional denoiser against per-class Gaussians (classifier-free guidance).

- :class:`LabeledDenoiser`: a network ``net(x, sigma, one_hot)`` as ``D(x, sigma)`` with labels bound
  (None: the all-zero null label, the unconditional denoiser of label-dropout training).
- :func:`transition_curves`: per sigma, the relative distance of the network's conditional,
  unconditional and guidance (``D_c - D_u``) outputs to the Gaussians', beside the same distance to
  a baseline denoiser at the same sigma (the empirical optimal denoiser of the same class / of all
  the data: the memorizing model), and their ratio, with bootstrap 95% intervals over the probes
  (a ratio below 1 says the network is closer to the linear model than to the baseline; it can fail),
  and the cosine of the two guidance directions.
- :func:`cpc_measurements`: per sigma, the overlap of the network's top-k right singular vectors of
  the Jacobian ``J_c - J_u`` of ``D_c - D_u`` (reported as singular vectors: ``J_c - J_u`` of a
  trained network is not symmetric, its ``symmetry`` is reported beside) with the Gaussian CPCs of
  the same class (the eigenvectors of the symmetric ``W_c - W_u`` of largest ``|eigenvalue|``,
  i.e. its top singular vectors), beside the overlap ``k / dim`` of a random subspace (the baseline).
- :func:`feature_coverage`: precision, density and coverage (Naeem et al. 2020) of sample features
  against data features, with 95% intervals over the samples.

The per-class Gaussians are :class:`diffcore.denoisers.ClassGaussians`; definitions in
docs/papers.md (classifier-free guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LabeledDenoiser:
    """A class-conditional network as ``D(x, sigma)`` with labels bound: ``net(x, sigma, one_hot)``,
    or the all-zero null label (the unconditional denoiser of label-dropout training) for None.
    ``labels`` [B] (int64), ``num_classes``: the one-hot width."""

    def __init__(self, net, labels: torch.Tensor | None, num_classes: int):
        self.net = net
        self.one_hot = None if labels is None else F.one_hot(labels, num_classes).float()

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        labels = None if self.one_hot is None else self.one_hot.to(x.device)
        return self.net(x, sigma, labels)


def class_rows(labels: torch.Tensor, cls: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` row indices of class ``cls`` in ``labels`` [P], drawn with replacement (seeded)."""
    rows = (labels == cls).nonzero()[:, 0]
    return rows[torch.randint(0, rows.shape[0], (count,), generator=generator)]


def transition_curves(
    net,
    gaussians,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigmas: list[float],
    *,
    samples_per_class: int,
    seed: int,
    device,
) -> list[dict]:
    """Relative distances of the network's denoisers to the Gaussian ones and to the empirical
    (memorizing) ones at the same sigma, a row per sigma.

    ``images`` [P, C, H, W] float32 with ``labels`` [P]: the pool the probes are drawn from
    (``samples_per_class`` per class, noised at each sigma; generator seeded with ``seed``);
    ``net(x, sigma, one_hot)`` runs on ``device``; ``gaussians``: a ``ClassGaussians``. For each
    of ``conditional`` (D_c), ``unconditional`` (D_u) and ``guidance`` (D_c - D_u) the row holds
    ``dist_<name>`` = |net - Gaussian|_F / |Gaussian|_F, ``dist_<name>_empirical`` = |net - E|_F / |E|_F
    (E: the empirical optimal denoiser of the class's images, of all images for D_u, their
    difference for the guidance) and ``ratio_<name>`` = |net - Gaussian|_F / |net - E|_F, each with
    ``_low`` / ``_high`` (bootstrap over the probes, :func:`diffcore.metrics.intervals.bootstrap_sums_each`,
    paired), and ``cos_guidance`` (mean cosine of the net's and the Gaussians' D_c - D_u)."""
    import numpy as np

    from diffcore.denoisers import EmpiricalDenoiser
    from diffcore.metrics import intervals

    k = gaussians.num_classes
    g = torch.Generator().manual_seed(seed)
    pick = torch.cat([class_rows(labels, cls, samples_per_class, g) for cls in range(k)])
    y, lab = images[pick], labels[pick]
    pool = images.float().cpu()
    empirical_u = EmpiricalDenoiser(pool)
    empirical_c = [EmpiricalDenoiser(pool[labels == cls]) for cls in range(k)]
    rows = []
    for sigma in sigmas:
        x = y + sigma * torch.randn(y.shape, generator=g)
        with torch.no_grad():
            dc_net, du_net = (
                LabeledDenoiser(net, lab_or_none, k)(x.to(device), sigma).double().cpu() for lab_or_none in (lab, None)
            )
        x_g = x.double().to(gaussians.unconditional.device)
        dc_g = gaussians.conditional_denoiser(lab)(x_g, sigma).cpu()
        du_g = gaussians.unconditional(x_g, sigma).cpu()
        x32 = x.float()
        du_e = empirical_u(x32, sigma).double()
        dc_e = torch.empty_like(du_e)
        for cls in range(k):
            rows_c = lab == cls
            dc_e[rows_c] = empirical_c[cls](x32[rows_c], sigma).double()
        pairs = {
            "conditional": (dc_net, dc_g, dc_e),
            "unconditional": (du_net, du_g, du_e),
            "guidance": (dc_net - du_net, dc_g - du_g, dc_e - du_e),
        }
        row: dict = {"sigma": sigma}
        for name, (a, gauss, emp) in pairs.items():
            sq = lambda t: t.flatten(1).square().sum(1)  # noqa: E731
            parts = torch.stack([sq(a - gauss), sq(gauss), sq(a - emp), sq(emp)], dim=1).numpy()
            stats = intervals.bootstrap_sums_each(
                parts,
                {
                    "dist": lambda s: np.sqrt(s[:, 0] / np.maximum(s[:, 1], 1e-300)),
                    "dist_empirical": lambda s: np.sqrt(s[:, 2] / np.maximum(s[:, 3], 1e-300)),
                    "ratio": lambda s: np.sqrt(s[:, 0] / np.maximum(s[:, 2], 1e-300)),
                },
                seed=seed,
            )
            for stat, key in (
                ("dist", f"dist_{name}"),
                ("dist_empirical", f"dist_{name}_empirical"),
                ("ratio", f"ratio_{name}"),
            ):
                row.update(intervals.flat(key, stats[stat]))
        g_net, g_g = pairs["guidance"][0], pairs["guidance"][1]
        row["cos_guidance"] = float(F.cosine_similarity(g_net.flatten(1), g_g.flatten(1), dim=1).mean())
        rows.append(row)
    return rows


def cpc_measurements(
    net,
    gaussians,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigmas: list[float],
    *,
    points: int,
    k: int,
    method: str,
    iters: int | None,
    seed: int,
    device,
) -> list[dict]:
    """Per-sample CPCs of the network against the Gaussian CPCs of the same class, a row per sigma.

    ``points`` probes (classes in turn; generator seeded with ``seed + 1``), the top ``k``
    components by ``method`` (``diffcore.analysis.contrastive_components``, ``iters`` None: its
    default). Each row: the mean subspace overlap of the network's top-k right singular vectors of
    ``J_c - J_u`` with the Gaussian's top-k CPCs (by |eigenvalue|) of the same class, with a
    bootstrap interval over the points (``overlap_low`` / ``overlap_high``) and per point, the
    random-subspace overlap ``k / dim``, the network's singular values and the Gaussian's
    ``|eigenvalues|`` (its singular values), the mean ``|<u_i, v_i>|`` (``symmetry``: 1 for a
    symmetric Jacobian; the network's singular vectors are not read as signed eigenvectors) and the
    largest residual."""
    from diffcore.analysis.cpc import contrastive_components, subspace_overlap
    from diffcore.metrics import intervals

    k_classes, dim = gaussians.num_classes, gaussians.dim
    g = torch.Generator().manual_seed(seed + 1)
    classes = torch.arange(points) % k_classes
    pick = torch.stack([class_rows(labels, int(cls), 1, g)[0] for cls in classes])
    y = images[pick]
    rows = []
    for sigma in sigmas:
        x = (y + sigma * torch.randn(y.shape, generator=g)).to(device)
        comps = contrastive_components(
            LabeledDenoiser(net, classes, k_classes),
            LabeledDenoiser(net, None, k_classes),
            x,
            sigma,
            k,
            method=method,
            iters=iters,
            seed=seed,
        )
        overlaps, gaussian_top = [], []
        for b, cls in enumerate(classes.tolist()):
            values, vectors = gaussians.contrastive_components(cls, sigma)
            top = values.abs().argsort(descending=True)[:k]
            gaussian_top.append(values[top].abs().tolist())
            net_vectors = comps.vectors[b].reshape(k, dim).double().cpu()
            overlaps.append(float(subspace_overlap(net_vectors, vectors[:, top].T.cpu())))
        overlap = intervals.bootstrap_interval(overlaps)
        rows.append(
            {
                "sigma": sigma,
                **intervals.flat("overlap", overlap),
                "overlap_points": overlaps,
                "random_overlap": k / dim,
                "net_singular_values": comps.subspace.singular_values.detach().cpu().tolist(),
                "gaussian_singular_values": gaussian_top,
                "symmetry": float(comps.symmetry.abs().mean()),
                "max_residual": float(comps.subspace.residuals.max()),
            }
        )
    return rows


def feature_coverage(
    real: torch.Tensor, fake: torch.Tensor, *, k: int = 5, resamples: int = 200, seed: int = 0
) -> dict:
    """Precision, density and coverage (Naeem et al. 2020) of ``fake`` [S, F] against ``real`` [R, F]
    features, each with a 95% interval over the samples.

    Each real point gets the ball of radius its distance to its k-th nearest other real point.
    ``precision``: the fraction of samples inside some ball (Wilson); ``density``: the mean number of
    balls a sample lies in, over k (bootstrap over samples); ``coverage``: the fraction of real points
    whose ball holds at least one sample (Wilson over the real points given the samples: a bootstrap
    over samples would be biased low, duplicated samples cover less; this interval omits the
    sample-to-sample variation). Returns ``{name: Interval}``."""
    from diffcore.metrics import intervals

    real64, fake64 = real.double().cpu(), fake.double().cpu()
    if real64.ndim != 2 or fake64.ndim != 2 or real64.shape[1] != fake64.shape[1]:
        raise ValueError(f"real, fake: expected [R, F] and [S, F], got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not 1 <= k < real64.shape[0]:
        raise ValueError(f"k: expected 1 <= k < {real64.shape[0]} (real points), got {k}")
    radii = torch.cdist(real64, real64).kthvalue(k + 1, dim=1).values  # the 0th is the point itself
    inside = (torch.cdist(fake64, real64) <= radii[None, :]).numpy()  # [S, R]
    counts = inside.sum(axis=1)
    return {
        "precision": intervals.wilson_interval(int((counts > 0).sum()), int(counts.shape[0])),
        "density": intervals.bootstrap_interval(counts / k, seed=seed),
        "coverage": intervals.wilson_interval(int(inside.any(axis=0).sum()), int(inside.shape[1])),
    }
