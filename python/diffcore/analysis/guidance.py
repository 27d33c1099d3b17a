"""Measures of a trained class-conditional denoiser against per-class Gaussians (classifier-free guidance).

- :class:`LabeledDenoiser`: a network ``net(x, sigma, one_hot)`` as ``D(x, sigma)`` with labels bound
  (None: the all-zero null label, the unconditional denoiser of label-dropout training).
- :func:`transition_curves`: per sigma, the relative distance of the network's conditional,
  unconditional and guidance (``D_c - D_u``) outputs to the Gaussians' (and of the residuals
  ``x - D``, which do not vanish at small sigma), with the cosine of the two guidance directions.
- :func:`cpc_measurements`: per sigma, the overlap of the network's contrastive principal
  components (the top eigenvectors of the Jacobian of ``D_c - D_u``) with the Gaussian ones of
  the same class, beside the overlap ``k / dim`` of a random subspace (the baseline).

The per-class Gaussians are :class:`diffcore.denoisers.ClassGaussians`; definitions in
docs/papers.md (classifier-free guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffcore.analysis.generalization import relative_distance


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
    """Relative distances of the network's denoisers to the Gaussian ones, a row per sigma.

    ``images`` [P, C, H, W] float32 with ``labels`` [P]: the pool the probes are drawn from
    (``samples_per_class`` per class, noised at each sigma; generator seeded with ``seed``);
    ``net(x, sigma, one_hot)`` runs on ``device``; ``gaussians``: a ``ClassGaussians``."""
    k = gaussians.num_classes
    g = torch.Generator().manual_seed(seed)
    pick = torch.cat([class_rows(labels, cls, samples_per_class, g) for cls in range(k)])
    y, lab = images[pick], labels[pick]
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
        g_net, g_g = dc_net - du_net, dc_g - du_g
        x64 = x.double()
        rows.append(
            {
                "sigma": sigma,
                "dist_conditional": relative_distance(dc_net, dc_g),
                "dist_unconditional": relative_distance(du_net, du_g),
                "dist_guidance": relative_distance(g_net, g_g),
                # the same error relative to the Gaussian's denoising residual x - D (its score times
                # sigma^2): at small sigma D ~ x and |D| hides the error, the residual does not
                "score_dist_conditional": relative_distance(dc_net - x64, dc_g - x64),
                "score_dist_unconditional": relative_distance(du_net - x64, du_g - x64),
                "cos_guidance": float(F.cosine_similarity(g_net.flatten(1), g_g.flatten(1), dim=1).mean()),
            }
        )
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
    default). Each row: mean and per-point subspace overlap, the random-subspace overlap ``k / dim``,
    both sets of eigenvalues, the symmetry of the network's Jacobian and the largest residual."""
    from diffcore.analysis.cpc import contrastive_components, subspace_overlap

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
            gaussian_top.append(values[top].tolist())
            net_vectors = comps.vectors[b].reshape(k, dim).double().cpu()
            overlaps.append(float(subspace_overlap(net_vectors, vectors[:, top].T.cpu())))
        rows.append(
            {
                "sigma": sigma,
                "overlap": sum(overlaps) / len(overlaps),
                "overlap_points": overlaps,
                "random_overlap": k / dim,
                "net_eigenvalues": comps.eigenvalues.cpu().tolist(),
                "gaussian_eigenvalues": gaussian_top,
                "symmetry": float(comps.symmetry.abs().mean()),
                "max_residual": float(comps.subspace.residuals.max()),
            }
        )
    return rows
