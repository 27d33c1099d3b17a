"""Representation quality of a denoiser's internal features across noise levels (docs/papers.md section 7).

- :func:`feature_layers` / :func:`extract_features`: features of any ``torch.nn.Module`` denoiser at
  named layers (forward hooks), for inputs ``x0 + sigma n``, spatially pooled or flattened. For a
  diffcore UNet the names are its own (``enc.8x8_block0``, ``dec.4x4_in1``, ...) with the aliases
  ``bottleneck`` (the last block at the lowest resolution, before the decoder climbs back up) and
  ``decoder_last`` (the decoder's last block at full resolution, before the output layers).
- :func:`linear_probe`: multinomial logistic regression fitted on one labelled split, scored on another.
- :func:`class_snr`: between-class energy over within-class energy of features.
- :func:`molrg_representation_curve`: the theory curve of the optimal (noisy) MoLRG denoiser: the
  SNR of its output in the true class subspace against the rest, and the posterior class confidence.
- :func:`curve_shape`: is a curve against sigma unimodal, where is its peak, how high (point values).
- :func:`interval_shape`: the same decided on 95% intervals per sigma (``diffcore.metrics.intervals``):
  a rise or fall counts only when the peak's interval lies clearly above the end's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffcore._checks import check_tensor

BOTTLENECK = "bottleneck"
DECODER_LAST = "decoder_last"
POOLINGS = ("mean", "flatten")


# ----------------------------------------------------------------------------- features


def _feature_root(model: torch.nn.Module) -> torch.nn.Module:
    """The diffcore UNet inside ``model`` (layer names are relative to it), else ``model`` itself."""
    from diffcore.models import UNet

    return next((m for m in model.modules() if isinstance(m, UNet)), model)


def _alias_path(root: torch.nn.Module, name: str) -> str | None:
    """The module path of an alias in a diffcore UNet (None for another model or name)."""
    dec = getattr(root, "dec", None)
    if not isinstance(dec, torch.nn.ModuleDict):
        return None
    if name == BOTTLENECK:
        found = [key for key in dec.keys() if "_in" in key]
    elif name == DECODER_LAST:
        found = [key for key in dec.keys() if "_block" in key]
    else:
        return None
    return f"dec.{found[-1]}" if found else None


def feature_layers(model: torch.nn.Module) -> list[str]:
    """The layer names :func:`extract_features` accepts for ``model``: for a diffcore UNet, its
    encoder and decoder blocks (``enc.<res>_<block>``, ``dec.<res>_<block>``), ``bottleneck`` and
    ``decoder_last``;
    for any other module, the paths of its named submodules."""
    root = _feature_root(model)
    names = [name for name, _ in root.named_modules() if name]
    if _alias_path(root, BOTTLENECK) is not None:
        names = [n for n in names if n.count(".") == 1 and n.split(".")[0] in ("enc", "dec")] + [
            BOTTLENECK,
            DECODER_LAST,
        ]
    return names


def _resolve_layer(root: torch.nn.Module, name: str) -> torch.nn.Module:
    path = _alias_path(root, name) if name in (BOTTLENECK, DECODER_LAST) else name
    modules = dict(root.named_modules())
    if path is None or path not in modules or not path:
        raise ValueError(f"layers: no layer {name!r}; this model has: {', '.join(feature_layers(root))}")
    return modules[path]


def _pool(output: torch.Tensor, pooling: str) -> torch.Tensor:
    if output.dim() > 2 and pooling == "mean":
        output = output.mean(dim=tuple(range(2, output.dim())))
    return output.reshape(output.shape[0], -1).double().cpu()


@torch.no_grad()
def extract_features(
    denoiser: torch.nn.Module,
    images: torch.Tensor,
    noise: torch.Tensor,
    sigma: float,
    layers: Sequence[str],
    *,
    pooling: str = "mean",
    batch_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Features of ``denoiser`` at ``layers`` for the inputs ``x = images + sigma * noise``.

    Args:
        denoiser: a module called as ``denoiser(x, sigma)`` (e.g. an EDM-preconditioned UNet).
        images, noise: ``[M, C, H, W]`` (same shape; the noise comes from per-sample seeds).
        sigma: the noise level (>= 0).
        layers: names from :func:`feature_layers`.
        pooling: ``mean`` (spatial average: ``[M, channels]``) or ``flatten`` (``[M, C*H*W]``).
    Returns ``{layer: [M, F] float64 CPU}``. The hooks only read: the denoiser's output is unchanged.
    """
    check_tensor("images", images, min_ndim=2)
    if noise.shape != images.shape:
        raise ValueError(f"noise: expected shape {tuple(images.shape)}, got {tuple(noise.shape)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    if not (float(sigma) >= 0 and math.isfinite(float(sigma))):
        raise ValueError(f"sigma: expected a finite value >= 0, got {sigma!r}")
    if not layers:
        raise ValueError("layers: name at least one layer")
    root = _feature_root(denoiser)
    modules = {name: _resolve_layer(root, name) for name in layers}
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: chunks[name].append(_pool(out, pooling)))
        for name, module in modules.items()
    ]
    try:
        device = next(denoiser.parameters(), torch.empty(0)).device
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size] + float(sigma) * noise[start : start + batch_size]
            x = x.to(device)
            denoiser(x, torch.full((x.shape[0],), float(sigma), device=device, dtype=x.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in chunks.items()}


# ----------------------------------------------------------------------------- probe and SNR


@dataclass(frozen=True)
class ProbeResult:
    """Accuracy of the fitted probe on the held-out split and on its own training split."""

    accuracy: float
    train_accuracy: float


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> ProbeResult:
    """Multinomial logistic regression ``softmax(W f + b)`` fitted on ``train_*`` and scored on ``test_*``.

    Features ``[M, F]`` are standardized with the training split's mean and standard deviation; the
    loss is the mean cross-entropy plus ``l2 / 2 |W|^2``, minimized in float64 by L-BFGS with a
    strong-Wolfe line search (deterministic). Labels are integer classes ``[M]``."""
    for name, feats, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        check_tensor(f"{name}_features", feats, ndim=2)
        check_tensor(f"{name}_labels", labels, ndim=1)
        if feats.shape[0] != labels.shape[0] or feats.shape[0] == 0:
            raise ValueError(
                f"{name}_features: expected a non-empty [M, F] matching {name}_labels [M], got "
                f"{tuple(feats.shape)} and {tuple(labels.shape)}"
            )
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features: expected {train_features.shape[1]} features, got {test_features.shape[1]}")
    if not l2 >= 0:
        raise ValueError(f"l2: expected a value >= 0, got {l2!r}")
    x, xt = train_features.double().cpu(), test_features.double().cpu()
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(xt).all())):
        raise ValueError("train_features, test_features: must be finite")
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)
    x, xt = (x - mean) / std, (xt - mean) / std
    y, yt = train_labels.long().cpu(), test_labels.long().cpu()
    classes = int(max(int(y.max()), int(yt.max()))) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = float(((xt @ weight + bias).argmax(1) == yt).double().mean())
        train_accuracy = float(((x @ weight + bias).argmax(1) == y).double().mean())
    return ProbeResult(accuracy, train_accuracy)


def class_snr(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class over within-class energy of features ``[M, F]`` with labels ``[M]``:

        SNR = sum_c M_c |mu_c - mu|^2 / sum_i |f_i - mu_{c(i)}|^2

    (the trace ratio of the between- and within-class scatter matrices; docs/papers.md section 7)."""
    check_tensor("features", features, ndim=2)
    check_tensor("labels", labels, ndim=1)
    if features.shape[0] != labels.shape[0] or features.shape[0] < 2:
        raise ValueError(
            f"features: expected [M >= 2, F] matching labels [M], got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    f = features.double().cpu()
    y = labels.long().cpu()
    mean = f.mean(0)
    between = within = 0.0
    for c in torch.unique(y):
        rows = f[y == c]
        centre = rows.mean(0)
        between += rows.shape[0] * float((centre - mean).square().sum())
        within += float((rows - centre).square().sum())
    return between / within if within > 0 else math.inf


# ----------------------------------------------------------------------------- theory (MoLRG)


def molrg_representation_curve(denoiser, sigmas: Sequence[float], *, num: int = 2000, seed: int = 0) -> list[dict]:
    """Representation SNR and class confidence of the optimal MoLRG denoiser against sigma.

    ``denoiser`` is a :class:`diffcore.denoisers.MoLRGDenoiser` (``noise_std`` > 0 for the noisy
    model of the paper). For ``num`` samples ``x0`` of classes ``k`` (seeded) and ``x = x0 + sigma n``,
    with ``P_k = U_k U_k^T`` and ``xhat = D(x; sigma)``:

        snr        = sum_i |P_{k_i} xhat_i|^2 / sum_i |(I - P_{k_i}) xhat_i|^2
        confidence = mean_i w_{k_i}(x_i)        (posterior weight of the true class)

    Small sigma: ``xhat`` keeps the data noise outside the class subspace (low SNR); intermediate:
    denoising removes it while the posterior still names the class (high SNR); large: the posterior
    flattens and ``xhat`` spreads over every class subspace (low SNR again). Rows:
    ``{sigma, snr, confidence, energy_in_class, energy_rest}`` (energies per sample)."""
    x0, labels = denoiser.sample(num, seed=seed, dtype=torch.float64, return_labels=True)
    x0 = x0.reshape(num, -1)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    bases = denoiser.bases.cpu()[labels.cpu()]  # [num, n, d]
    rows = []
    for sigma in sigmas:
        x = x0 + float(sigma) * noise
        xhat = denoiser(x.to(denoiser.device), float(sigma)).cpu().reshape(num, -1)
        inside = torch.einsum("bnd,bd->bn", bases, torch.einsum("bnd,bn->bd", bases, xhat))
        e_in, e_rest = float(inside.square().sum()), float((xhat - inside).square().sum())
        weights = denoiser.posterior_weights(x.to(denoiser.device), float(sigma)).cpu()
        rows.append(
            {
                "sigma": float(sigma),
                "snr": e_in / e_rest if e_rest > 0 else math.inf,
                "confidence": float(weights.gather(1, labels.cpu()[:, None]).mean()),
                "energy_in_class": e_in / num,
                "energy_rest": e_rest / num,
            }
        )
    return rows


def curve_shape(sigmas: Sequence[float], values: Sequence[float], tolerance: float) -> dict:
    """Shape of a curve against increasing ``sigmas``: ``peak_sigma``, ``peak`` (its height),
    ``rise`` (peak minus the value at the smallest sigma), ``fall`` (peak minus the value at the
    largest) and ``shape``: ``unimodal`` when both exceed ``tolerance``, ``decreasing`` when the
    rise does not, ``increasing`` when only the fall does not."""
    if len(sigmas) != len(values) or len(values) < 3:
        raise ValueError(f"values: expected one value per sigma and at least 3, got {len(values)} for {len(sigmas)}")
    if any(b <= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas: expected increasing values")
    peak_index = max(range(len(values)), key=lambda i: values[i])
    peak = float(values[peak_index])
    rise, fall = peak - float(values[0]), peak - float(values[-1])
    shape = (
        "unimodal" if rise > tolerance and fall > tolerance else ("decreasing" if rise <= tolerance else "increasing")
    )
    return {"shape": shape, "peak_sigma": float(sigmas[peak_index]), "peak": peak, "rise": rise, "fall": fall}


def interval_shape(sigmas: Sequence[float], curve: Sequence) -> dict:
    """Shape of a curve of :class:`diffcore.metrics.intervals.Interval` against increasing ``sigmas``,
    decided on the intervals (never on point estimates):

    - ``rises``: the peak (largest point estimate) lies clearly above the value at the smallest sigma
      (``intervals.clearly_above``: the peak's lower end above the first point's upper end);
    - ``falls``: the peak lies clearly above the value at the largest sigma;
    - ``shape``: ``unimodal`` (rises and falls; ``intervals.dips`` of the negated curve),
      ``decreasing`` (no point clearly above the first, and the first clearly above the last),
      ``increasing`` (the mirror image), else ``flat`` (no decision the sampling error allows).

    Returns ``{shape, rises, falls, peak_sigma, peak, first, last}`` (intervals as dicts)."""
    from diffcore.metrics import intervals

    if len(sigmas) != len(curve) or len(curve) < 3:
        raise ValueError(f"curve: expected one interval per sigma and at least 3, got {len(curve)} for {len(sigmas)}")
    if any(b <= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas: expected increasing values")
    negated = [intervals.Interval(-c.value, -c.high, -c.low, c.level, c.method, c.n) for c in curve]
    dip = intervals.dips(negated)
    peak_index = int(dip["at"])
    peak, first, last = curve[peak_index], curve[0], curve[-1]
    rises, falls = intervals.clearly_above(peak, first), intervals.clearly_above(peak, last)
    if dip["holds"]:
        shape = "unimodal"
    elif not any(intervals.clearly_above(c, first) for c in curve[1:]) and intervals.clearly_above(first, last):
        shape = "decreasing"
    elif not any(intervals.clearly_above(c, last) for c in curve[:-1]) and intervals.clearly_above(last, first):
        shape = "increasing"
    else:
        shape = "flat"
    return {
        "shape": shape,
        "rises": bool(rises),
        "falls": bool(falls),
        "peak_sigma": float(sigmas[peak_index]),
        "peak": peak.as_dict(),
        "first": first.as_dict(),
        "last": last.as_dict(),
    }
