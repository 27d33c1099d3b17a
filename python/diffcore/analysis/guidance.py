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
- :class:`JacobianCPCGuidance`: the paper's CPC guidance in the nonlinear regime, a guidance term
  ``G(x) = [J_c(x) - J_u(x)]_k (x - mu_c)``: the linear CPC term ``(W_c - W_u)(x - mu_c)`` with the
  denoisers' Jacobians at the current state in place of the Gaussian ``W`` (all components by one
  JVP, or the top-k singular triplets of ``J_c - J_u`` by JVP/VJP subspace iteration).
- :func:`cpc_term_alignment`: per sigma, the cosine and norm ratio of that Jacobian CPC term against
  the Gaussians' linear CPC term at noisy data points, beside a random direction's cosine.
- :func:`at_equal_accuracy`: a method's metrics interpolated along its accuracy-vs-strength curve
  to a fixed target accuracy.

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


class JacobianCPCGuidance:
    """CPC guidance with per-sample Jacobians (docs/papers.md section 8, nonlinear regime).

    The linear CPC term of the Gaussians, ``(W_c - W_u)(x - mu_c)`` (positive plus negative CPCs,
    :class:`diffcore.denoisers.ClassGaussians`), with the Jacobians of the conditional and
    unconditional denoisers at the current state in place of ``W_c`` and ``W_u``:

        G(x, sigma) = [J_c(x) - J_u(x)]_k (x - mu_c),     J = dD(x; sigma)/dx.

    ``rank`` 0: all components, ``(J_c - J_u)(x - mu_c)`` exactly, by one JVP of ``D_c - D_u``
    (cost about that of two forward passes with tangents). ``rank`` k > 0: the best rank-k
    approximation ``sum_i s_i u_i <v_i, x - mu_c>`` from the top-k singular triplets of
    ``J_c - J_u`` (:func:`diffcore.analysis.jacobian_subspace`, ``subspace_kwargs``: method, iters,
    ...), i.e. the top-k per-sample CPCs; ``J_c - J_u`` of a trained network is not symmetric, so
    ``u_i`` and ``v_i`` are kept apart. For Gaussian class-conditionals the Jacobians are ``W_c`` and
    ``W_u`` and ``G`` is the Gaussians' positive + negative term (rank 0) or its top-k part by
    ``|eigenvalue|`` (tests/analysis/test_guidance_measures.py).

    Args:
        conditional, unconditional: denoisers ``D(x [B, ...], sigma)`` (pure torch, labels bound).
        anchors: ``mu_c`` per row, [B, ...] (the class means of the rows' labels).
        rank: 0 (all components) or the number of top components.
    Call as a :class:`diffcore.sampler.GuidedDenoiser` term: ``G(x, sigma, base_output) -> [B, ...]``
    (``base_output`` unused), in x's dtype.
    """

    def __init__(self, conditional, unconditional, anchors: torch.Tensor, *, rank: int = 0, **subspace_kwargs):
        if not callable(conditional) or not callable(unconditional):
            raise TypeError("conditional, unconditional: expected denoisers D(x, sigma)")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"rank: expected an integer >= 0 (0: all components), got {rank!r}")
        if not isinstance(anchors, torch.Tensor) or anchors.ndim < 2:
            got = getattr(anchors, "shape", anchors)
            raise ValueError(f"anchors: expected a tensor [B, ...] of class means, got {got!r}")
        self.conditional, self.unconditional = conditional, unconditional
        self.anchors, self.rank, self.subspace_kwargs = anchors, rank, subspace_kwargs

    def __call__(self, x: torch.Tensor, sigma, base_output: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape != self.anchors.shape:
            raise ValueError(f"x: expected shape {tuple(self.anchors.shape)} (the anchors'), got {tuple(x.shape)}")
        offset = (x - self.anchors.to(device=x.device, dtype=x.dtype)).detach()

        def difference(y: torch.Tensor, s=sigma) -> torch.Tensor:
            return self.conditional(y, s) - self.unconditional(y, s)

        if self.rank == 0:
            with torch.enable_grad():
                _, tangent = torch.func.jvp(lambda y: difference(y), (x.detach(),), (offset,))
            return tangent.detach().to(x.dtype)
        from diffcore.analysis.jacobian import jacobian_subspace

        with torch.enable_grad():
            sub = jacobian_subspace(difference, x.detach(), sigma, self.rank, **self.subspace_kwargs)
        u, v = sub.U.detach(), sub.V.detach()  # [B, k, ...]
        coeff = sub.singular_values.detach() * (v * offset.unsqueeze(1).to(v.dtype)).flatten(2).sum(2)  # [B, k]
        return (u * coeff.view(*coeff.shape, *([1] * (u.ndim - 2)))).sum(1).to(x.dtype)


def at_equal_accuracy(curve: list[dict], target: float, metrics: tuple[str, ...]) -> dict | None:
    """One method's metrics at a fixed ``target`` accuracy, by linear interpolation along its
    accuracy-vs-strength curve.

    ``curve``: the method's settings, each ``{"w": strength, "accuracy": {"value", "low", "high"},
    <metric>: {"value", "low", "high"} or a number}`` (any order; sorted by strength). The first
    pair of consecutive strengths whose accuracies bracket ``target`` (``a_i <= target <= a_{i+1}``
    or the reverse) gives the fraction ``t = (target - a_i) / (a_{i+1} - a_i)``; each metric's
    value and interval ends are interpolated with the same ``t`` (an interpolation of the two
    settings' bootstrap / Wilson intervals, not a new resampling). Returns ``{"w", "fraction",
    "between": [w_i, w_{i+1}], <metric>: {"value", "low", "high"} or number}``, or None when no
    pair brackets ``target`` (the method does not reach it within its sweep)."""
    if not 0 < target < 1:
        raise ValueError(f"target: expected an accuracy in (0, 1), got {target!r}")
    points = sorted(curve, key=lambda s: s["w"])
    for a, b in zip(points, points[1:]):
        lo, hi = a["accuracy"]["value"], b["accuracy"]["value"]
        if lo == hi or not min(lo, hi) <= target <= max(lo, hi):
            continue
        t = (target - lo) / (hi - lo)
        out: dict = {"w": a["w"] + t * (b["w"] - a["w"]), "fraction": t, "between": [a["w"], b["w"]]}
        for name in metrics:
            va, vb = a[name], b[name]
            if isinstance(va, dict):
                out[name] = {key: va[key] + t * (vb[key] - va[key]) for key in ("value", "low", "high")}
            else:
                out[name] = va + t * (vb - va)
        return out
    return None


def cpc_term_alignment(
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
    """Per sigma, how the network's Jacobian CPC term ``(J_c - J_u)(x - mu_c)``
    (:class:`JacobianCPCGuidance`, all components) compares with the Gaussians' linear CPC term
    ``(W_c - W_u)(x - mu_c)`` (positive + negative) at noisy images ``x = y + sigma z``
    (``samples_per_class`` per class from ``images`` [P, ...] / ``labels`` [P], generator seeded with
    ``seed + 2``). Each row: ``cos`` (mean cosine of the two terms), ``norm_ratio``
    (|net term| / |Gaussian term|, mean over probes) and ``cos_random`` (mean |cosine| of the net's
    term with a random direction: the baseline a chance alignment gives), each with bootstrap 95%
    intervals over the probes (``_low`` / ``_high``)."""
    from diffcore.metrics import intervals

    k = gaussians.num_classes
    g = torch.Generator().manual_seed(seed + 2)
    pick = torch.cat([class_rows(labels, cls, samples_per_class, g) for cls in range(k)])
    y, lab = images[pick].float(), labels[pick]
    anchors = torch.stack([gaussians.conditional[int(c)].mean for c in lab.tolist()]).reshape(y.shape).float()
    rows = []
    for sigma in sigmas:
        x = y + sigma * torch.randn(y.shape, generator=g)
        term = JacobianCPCGuidance(
            LabeledDenoiser(net, lab.to(device), k), LabeledDenoiser(net, None, k), anchors.to(device)
        )
        net_term = term(x.to(device), sigma).double().cpu().flatten(1)
        split = gaussians.split(x.double().to(gaussians.unconditional.device), sigma, lab)
        gauss_term = (split.positive + split.negative).cpu().flatten(1)
        random = torch.randn(net_term.shape, generator=g, dtype=torch.float64)
        row: dict = {"sigma": sigma}
        row.update(
            intervals.flat(
                "cos", intervals.bootstrap_interval(F.cosine_similarity(net_term, gauss_term).numpy(), seed=seed)
            )
        )
        ratio = (net_term.norm(dim=1) / gauss_term.norm(dim=1).clamp_min(1e-300)).numpy()
        row.update(intervals.flat("norm_ratio", intervals.bootstrap_interval(ratio, seed=seed)))
        chance = F.cosine_similarity(net_term, random).abs().numpy()
        row.update(intervals.flat("cos_random", intervals.bootstrap_interval(chance, seed=seed)))
        rows.append(row)
    return rows
