"""Mechanisms of classifier-free guidance, linear and nonlinear (docs/papers.md section 8).

One class-conditional DDPM++ is trained with label dropout (``diffcore.train``: ``label_dropout``,
the all-zero null label), so it is both the conditional denoiser ``D_c`` (one-hot label) and the
unconditional ``D_u`` (null label). Class Gaussians fitted to the same data
(``diffcore.denoisers.ClassGaussians``) give the linear model and the exact split

    D_c - D_u = (W_c - W_u)(x - mu_c) + (I - W_u)(mu_c - mu_u)
              = positive CPCs + negative CPCs + mean shift.

Sample sets (same seeds and labels for every setting; guidance by ``diffcore.sampler``'s
``GuidedDenoiser``, ``D_c + w G``; convention ``D_u + (1 + w)(D_c - D_u)`` for CFG):

- trained model: unconditional, conditional (w = 0), CFG at each ``guidance_scales`` w, CFG at
  ``linear_scale`` limited to ``(s, inf]`` and to ``(0, s]`` for each ``split_sigmas`` s, and each
  linear term (positive, negative, mean_shift) and all of them (the Gaussians' ``D_c - D_u``) added to
  the trained model's conditional denoiser at ``linear_scale`` inside ``(linear_low, inf]``;
- Gaussian model: conditional, and each linear term / all at ``gaussian_scale`` (everywhere: for
  the Gaussians the linear split is exact at every sigma);
- the paper's CPC guidance in the nonlinear regime, on the trained model at each
  ``cpc_guidance_scales`` w (everywhere): ``D_c + w [J_c(x) - J_u(x)]_k (x - mu_c)``, the linear
  positive + negative CPC term with the network's Jacobians at the current state and step in place
  of the Gaussian ``W`` (``diffcore.analysis.guidance.JacobianCPCGuidance``; ``cpc_guidance_rank``
  0: all components by one JVP per step, k: the top-k singular triplets of ``J_c - J_u`` by
  ``cpc_guidance_iters`` rounds of JVP/VJP subspace iteration).

Equal-accuracy comparison (:func:`equal_accuracy_comparison`): plain CFG's and the Jacobian CPC
guidance's accuracy-vs-strength curves (w = 0: the conditional model) are each interpolated to the
class accuracy ``equal_accuracy`` (0.95, fixed before the runs), and the Frechet distance,
precision, density, coverage and diversity compared there (the two bracketing settings' intervals
interpolated alike); claims: the CPC guidance reaches the target, and its FD is lower / precision,
coverage, density higher than CFG's there (each may fail either way).

Metrics per set (``hooks``), each with a 95% interval: class accuracy of the samples under the
digits classifier (Wilson), a Frechet distance in its feature space to the data (bootstrap over the
samples, ``frechet_resamples`` draws), precision, density and coverage in the same feature space
(:func:`diffcore.analysis.guidance.feature_coverage`, k = 5), and per-class diversity (mean pairwise
RMS distance per pixel between samples of one class, averaged over classes; the data's value is
reported alongside). Claims (``intervals.claim``): the conditional model is not saturated, CFG and
each linear term raise accuracy, CFG lowers coverage, CFG at low sigma only costs less Frechet
distance, the network is closer to the Gaussians than to the memorizing denoiser above
``linear_low``, the per-sample CPC subspaces overlap the Gaussian ones more than random subspaces,
the Jacobian CPC guidance reaches the equal-accuracy target and beats CFG there (FD, precision,
coverage, density), and its term points along the Gaussians' CPC term beyond a random direction
(``cpc_term_alignment``, an analysis unit: cosine and norm ratio per sigma).

Linear-to-nonlinear transition (an analysis unit): on the ``num_sigmas`` Karras grid, noisy images
``x = y + sigma z`` of every class: ``|D_c^net - D_c^G| / |D_c^G|``, the same for ``D_u`` and for
the guidance difference ``g = D_c - D_u`` (and its mean cosine), beside the same distances to the
empirical optimal (memorizing) denoisers ``E`` at the same sigma and the ratio
``|net - G| / |net - E|`` (bootstrap intervals over the probes): below 1 the network is closer to the
linear model than to the baseline, a comparison that can fail at any sigma. At ``cpc_sigmas`` of
those sigmas per-sample CPCs of the trained model (top ``cpc_k`` right singular vectors of
``J_c - J_u`` by batched JVP/VJP, ``diffcore.analysis.contrastive_components``; ``J_c - J_u`` is not
symmetric, so they are reported as singular vectors with their singular values and the symmetry
``|<u, v>|``) against the Gaussian's top ``cpc_k`` CPCs of the same class by ``|eigenvalue|``:
subspace overlap (mean cos^2 of principal angles, bootstrap interval over points; random: k/d).

Outputs: ``results.json``, ``settings.csv``, ``transition.csv``, ``cfg-samples.png``,
``cfg-metrics.png``, ``cfg-cpc.png``, ``cfg-transition.png``, ``timings.json``. The trained model,
every sample set and the analysis are resumable units.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcore.analysis import guidance as guidance_measures
from diffcore.analysis.guidance import JacobianCPCGuidance, LabeledDenoiser
from diffcore.experiments import _stack, base, plotting, recipes

log = logging.getLogger(__name__)

NAME = "cfg"
LINEAR_TERMS = ("positive", "negative", "mean_shift", "all")


@dataclass(frozen=True)
class CFGConfig:
    dataset: str = "digits"  # digits | cifar10 (class labels required)
    data_root: str = ""  # cifar10: the local folder
    inception_weights: str = ""  # cifar10: FID's Inception-v3 weights file (local)
    model_preset: str = "ddpmpp-digits-light"  # diffcore.models preset
    width: int = 16  # model_channels
    train_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    lr_warmup_images: int = 2000
    ema_halflife_images: float = 20000.0
    label_dropout: float = 0.1  # probability of the null label in training
    augment: str = "none"  # none | xflip
    train_seed: int = 0
    guidance_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # CFG w (w = 0 is always sampled)
    cpc_guidance_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # Jacobian CPC guidance w (everywhere)
    cpc_guidance_rank: int = 0  # its components: 0 all ((J_c - J_u)(x - mu_c) by one JVP), k: top k
    cpc_guidance_iters: int = 4  # subspace-iteration rounds per step when cpc_guidance_rank > 0
    cpc_guidance_split_scale: float = 1.0  # w of the Jacobian CPC guidance limited to each split_sigmas side
    equal_accuracy: float = 0.95  # the class accuracy the two guidance methods are compared at
    alignment_samples: int = 10  # noisy images per class and sigma: Jacobian CPC term vs the Gaussians' CPC term
    linear_scale: float = 2.0  # w of the limited-interval CFG and of the linear terms
    split_sigmas: tuple[float, ...] = (1.0,)  # CFG limited to (s, inf] and to (0, s]
    linear_low: float = 1.0  # linear terms on the model act in (linear_low, inf]
    gaussian_scale: float = 0.5  # w of the linear terms on the Gaussian model (everywhere)
    samples_per_class: int = 50
    sample_seed_start: int = 0
    solver: str = "euler"  # the paper's sampler
    sampler_steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sample_batch: int = 1000  # samples per sampler batch
    num_sigmas: int = 16  # analysis grid (Karras, rho = 7)
    distance_samples: int = 32  # noisy images per class and sigma
    cpc_sigmas: int = 6  # analysis sigmas (evenly picked) with per-sample CPCs
    cpc_points: int = 10  # points per such sigma (classes in turn)
    cpc_k: int = 8
    cpc_method: str = "lanczos"  # diffcore.analysis.jacobian_subspace method
    cpc_iters: int = 0  # its iters (0: the method's default)
    probe_seed: int = 7
    frechet_resamples: int = 200  # bootstrap draws of each set's Frechet distance (>= 100)
    saturated_accuracy: float = 0.9  # the conditional model is "not saturated" when its accuracy interval lies below
    grid_per_class: int = 2  # samples per class in cfg-samples.png
    torch_threads: int = 1  # intra-op threads on the CPU (0: leave as is)

    def __post_init__(self):
        # ints as floats (validate() refuses anything else)
        for name in ("guidance_scales", "cpc_guidance_scales", "split_sigmas"):
            value = getattr(self, name)
            if isinstance(value, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        base.check_fields(self, FIELD_CHECKS)
        if self.dataset != "cifar10" and self.inception_weights:
            raise base.ConfigError(
                "inception_weights: only used with dataset=cifar10 (digits use the shipped digits CNN)"
            )
        if not self.sigma_max > self.sigma_min:
            raise base.ConfigError(
                f"sigma_max: expected a number > sigma_min = {self.sigma_min:g}, got {self.sigma_max!r}"
            )
        if self.linear_low > self.sigma_max:
            raise base.ConfigError(
                f"linear_low: expected a number in [0, sigma_max = {self.sigma_max:g}], got {self.linear_low!r}"
            )
        for s in self.split_sigmas:
            if not self.sigma_min < s < self.sigma_max:
                raise base.ConfigError(
                    f"split_sigmas: expected numbers in (sigma_min, sigma_max) = "
                    f"({self.sigma_min:g}, {self.sigma_max:g}), got {self.split_sigmas!r}"
                )
        if self.cpc_method == "lanczos" and 0 < self.cpc_iters < self.cpc_k:
            raise base.ConfigError(
                f"cpc_iters: lanczos needs at least cpc_k = {self.cpc_k} steps, got {self.cpc_iters}"
            )
        if self.equal_accuracy >= 1:
            raise base.ConfigError(f"equal_accuracy: expected an accuracy in (0, 1), got {self.equal_accuracy!r}")
        if self.cpc_sigmas > self.num_sigmas:
            raise base.ConfigError(f"cpc_sigmas: at most num_sigmas = {self.num_sigmas}, got {self.cpc_sigmas}")
        if self.grid_per_class > self.samples_per_class:
            raise base.ConfigError(
                f"grid_per_class: at most samples_per_class = {self.samples_per_class}, got {self.grid_per_class}"
            )


_SCALE = base.number(-1e3, 1e3)
FIELD_CHECKS: dict[str, base.Check] = {
    "dataset": base.one_of("digits", "cifar10"),  # class-conditional: a labelled dataset with its classes
    "ema_halflife_images": base.positive_number,
    "augment": base.one_of("none", "xflip"),
    "guidance_scales": base.tuple_of(base.number(0, 1e3, lo_open=True), min_len=0),
    "cpc_guidance_scales": base.tuple_of(base.number(0, 1e3, lo_open=True), min_len=0),
    "cpc_guidance_rank": base.count,
    "cpc_guidance_iters": base.positive,
    "equal_accuracy": base.number(0, 1, lo_open=True),
    "cpc_guidance_split_scale": _SCALE,
    "alignment_samples": base.positive,
    "linear_scale": _SCALE,
    "split_sigmas": base.tuple_of(base.positive_number, min_len=0),
    "linear_low": base.number(0),
    "gaussian_scale": _SCALE,
    "samples_per_class": base.positive,
    "distance_samples": base.positive,
    "cpc_sigmas": base.count,
    "cpc_points": base.positive,
    "cpc_k": base.positive,
    "cpc_method": base.one_of("subspace", "randomized", "lanczos"),
    "cpc_iters": base.count,
    "frechet_resamples": base.integer(100),
    "saturated_accuracy": base.number(0, 1),
    "grid_per_class": base.positive,
}


def _quick() -> CFGConfig:
    """The embedded digits, one light UNet of width 8 trained 500 steps: a model whose conditional
    samples are not all of their class (the width-16, 1500-step model of 0.1.0 reached 0.958
    unguided, where every guidance term saturates); the setting was checked on ``train_seed=1``
    and is reported on ``train_seed=0`` (docs/studies.md)."""
    return CFGConfig(width=8, train_steps=500)


def _tiny() -> CFGConfig:
    """Seconds (tests): a few training steps, few samples, a short analysis."""
    return CFGConfig(
        width=8,
        train_steps=20,
        batch_size=32,
        guidance_scales=(1.0,),
        cpc_guidance_scales=(1.0,),
        alignment_samples=1,
        samples_per_class=2,
        sampler_steps=5,
        num_sigmas=3,
        distance_samples=2,
        cpc_sigmas=2,
        cpc_points=2,
        cpc_k=2,
        cpc_method="subspace",
        cpc_iters=3,
        grid_per_class=1,
        frechet_resamples=100,
    )


def _paper() -> CFGConfig:
    """CIFAR-10 from a local folder (set data_root), class-conditional DDPM++ at EDM's CIFAR-10
    settings (batch 512, lr 1e-3, 200 Mimg, EMA half-life 0.5 Mimg, x-flips) with label dropout 0.1
    (diffcore's choice: EDM's conditional models had none); a GPU run."""
    return CFGConfig(
        **recipes.EDM_CIFAR10_TRAINING,
        width=128,
        batch_size=512,
        ema_halflife_images=500_000.0,
        augment="xflip",
        guidance_scales=(0.5, 1.0, 2.0, 4.0),
        split_sigmas=(0.5, 2.0),
        samples_per_class=1000,
        sampler_steps=32,
        num_sigmas=20,
        distance_samples=64,
        cpc_sigmas=6,
        cpc_points=20,
        cpc_k=16,
        cpc_method="subspace",
        torch_threads=0,
    )


PRESETS: dict[str, Callable[[], CFGConfig]] = {"quick": _quick, "tiny": _tiny, "paper": _paper}
CONFIG_CLASS = CFGConfig


# ----------------------------------------------------------------------------- hooks (metrics)


@dataclass
class CFGHooks:
    """Sample-quality metrics: ``classify(images [N, C, H, W] in [-1, 1]) -> labels [N]`` (None: no
    classifier, accuracy reported as null), ``features(images) -> [N, F]`` and
    ``frechet(features [N, F], reference) -> float`` where ``reference`` is the data's
    :class:`diffcore.metrics.FeatureStatistics` (computed once: each set's distance is bootstrapped)."""

    classify: Callable[[torch.Tensor], torch.Tensor] | None
    features: Callable[[torch.Tensor], torch.Tensor]
    frechet: Callable[[torch.Tensor, torch.Tensor], float]


def default_hooks(config: CFGConfig, device: str = "cpu") -> CFGHooks:
    """``diffcore.metrics``: digits: the shipped digits CNN (classes, 64-d features); cifar10: FID's
    Inception-v3 features from ``inception_weights`` and no classifier (none ships for CIFAR-10)."""
    from diffcore import metrics

    if config.dataset == "digits":
        network = metrics.digits_classifier(device)
        return CFGHooks(
            classify=_batched(network.predict, device),
            features=_batched(network, device),
            frechet=metrics.frechet_distance,
        )
    if not config.inception_weights:
        raise base.ConfigError(
            "inception_weights: cifar10 needs a local file of FID's Inception-v3 weights (see docs/metrics.md)"
        )
    log.warning("cfg: no CIFAR-10 classifier ships with diffcore; class accuracy is reported as null")
    return CFGHooks(
        classify=None,
        features=_batched(metrics.inception_features(config.inception_weights, device), device),
        frechet=metrics.frechet_distance,
    )


def _batched(network, device, batch_size: int = 500):
    """``images -> network(images)`` in batches on ``device``, without gradients, returned on the CPU."""

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([network(chunk.to(device)).cpu() for chunk in images.split(batch_size)])

    return run


# ----------------------------------------------------------------------------- denoisers


def setting_list(c: CFGConfig) -> list[dict]:
    """Every sample set of the study: name, model (net | gaussian), guidance, w, interval."""
    everywhere = (0.0, math.inf)
    out = [
        _setting("net unconditional", "net", "unconditional", 0.0, everywhere),
        _setting("net conditional", "net", "none", 0.0, everywhere),
    ]
    out += [_setting(f"net cfg w={w:g}", "net", "cfg", w, everywhere) for w in c.guidance_scales]
    out += [_setting(f"net jacobian cpc w={w:g}", "net", "jacobian_cpc", w, everywhere) for w in c.cpc_guidance_scales]
    for s in c.split_sigmas:
        out += [
            _setting(f"net cfg w={c.linear_scale:g} sigma>{s:g}", "net", "cfg", c.linear_scale, (s, math.inf)),
            _setting(f"net cfg w={c.linear_scale:g} sigma<={s:g}", "net", "cfg", c.linear_scale, (0.0, s)),
        ]
    w_split = c.cpc_guidance_split_scale
    for s in c.split_sigmas:
        out += [
            _setting(f"net jacobian cpc w={w_split:g} sigma>{s:g}", "net", "jacobian_cpc", w_split, (s, math.inf)),
            _setting(f"net jacobian cpc w={w_split:g} sigma<={s:g}", "net", "jacobian_cpc", w_split, (0.0, s)),
        ]
    out += [
        _setting(
            f"net + linear {t} w={c.linear_scale:g} sigma>{c.linear_low:g}",
            "net",
            t,
            c.linear_scale,
            (c.linear_low, math.inf),
        )
        for t in LINEAR_TERMS
    ]
    out += [_setting("gaussian conditional", "gaussian", "none", 0.0, everywhere)]
    out += [
        _setting(f"gaussian + linear {t} w={c.gaussian_scale:g}", "gaussian", t, c.gaussian_scale, everywhere)
        for t in LINEAR_TERMS
    ]
    return out


def _setting(name, model, guidance, w, interval) -> dict:
    """One sample setting; an unbounded interval's ``high`` is None (results are strict JSON)."""
    high = None if interval[1] == math.inf else float(interval[1])
    return {"name": name, "model": model, "guidance": guidance, "w": float(w), "low": float(interval[0]), "high": high}


def guided_denoiser(setting: dict, net, gaussians, labels: torch.Tensor, *, cpc_rank: int = 0, cpc_iters: int = 4):
    """The denoiser of one setting for a batch with class ``labels`` [B] (``cpc_rank``, ``cpc_iters``:
    the Jacobian CPC guidance's components and subspace rounds, :class:`JacobianCPCGuidance`)."""
    from diffcore import sampler

    k = gaussians.num_classes
    if setting["model"] == "net":
        base = LabeledDenoiser(net, None if setting["guidance"] == "unconditional" else labels, k)
    else:
        base = gaussians.conditional_denoiser(labels)
    if setting["guidance"] in ("none", "unconditional"):
        return base
    high = math.inf if setting["high"] is None else setting["high"]
    interval = sampler.GuidanceInterval(setting["low"], high, closed="right")
    if setting["guidance"] == "cfg":
        return sampler.classifier_free_guidance(base, LabeledDenoiser(net, None, k), setting["w"], interval)
    if setting["guidance"] == "jacobian_cpc":
        means = torch.stack([gaussians.conditional[int(cls)].mean for cls in labels.tolist()])
        anchors = means.reshape(labels.shape[0], *gaussians.shape).float().to(labels.device)
        term = JacobianCPCGuidance(
            base, LabeledDenoiser(net, None, k), anchors, rank=cpc_rank, method="subspace", iters=cpc_iters
        )
        return sampler.GuidedDenoiser(base, term, setting["w"], interval)
    return sampler.GuidedDenoiser(base, gaussians.term(setting["guidance"], labels), setting["w"], interval)


# ----------------------------------------------------------------------------- metrics


def per_class_diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise RMS-per-pixel distance between images of one class."""
    values = []
    for c in labels.unique().tolist():
        rows = images[labels == c].reshape(int((labels == c).sum()), -1).double()
        if rows.shape[0] < 2:
            continue
        d = torch.cdist(rows, rows) / math.sqrt(rows.shape[1])
        values.append(float(d.sum() / (rows.shape[0] * (rows.shape[0] - 1))))
    return sum(values) / len(values) if values else float("nan")


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, hooks: CFGHooks) -> float | None:
    """Fraction of ``images`` the classifier puts in ``labels`` (None without a classifier)."""
    if hooks.classify is None:
        return None
    return float((hooks.classify(images).cpu() == labels.cpu()).double().mean())


def sample_metrics(
    samples: torch.Tensor, labels: torch.Tensor, hooks: CFGHooks, data_features: torch.Tensor, c: CFGConfig
) -> dict:
    """Accuracy, Frechet distance, precision, density, coverage (each ``{value, low, high, ...}``, a
    95% interval) and per-class diversity of one sample set."""
    from diffcore.analysis.guidance import feature_coverage
    from diffcore.metrics import FeatureStatistics, intervals

    features = hooks.features(samples).double().cpu()
    accuracy = None
    if hooks.classify is not None:
        correct = int((hooks.classify(samples).cpu() == labels.cpu()).sum())
        accuracy = intervals.wilson_interval(correct, int(labels.shape[0])).as_dict()
    reference = FeatureStatistics.from_features(data_features.double().cpu())
    frechet = intervals.bootstrap_interval(
        features.numpy(),
        lambda a: float(hooks.frechet(torch.from_numpy(a), reference)),
        resamples=c.frechet_resamples,
        seed=c.probe_seed,
    )
    coverage = feature_coverage(data_features, features, seed=c.probe_seed)
    return {
        "accuracy": accuracy,
        "frechet": frechet.as_dict(),
        **{name: value.as_dict() for name, value in coverage.items()},
        "diversity": per_class_diversity(samples, labels),
    }


def study_claims(settings: list[dict], transition: list[dict], cpc: list[dict], c: CFGConfig) -> dict:
    """The study's yes/no properties, each decided on 95% intervals (``intervals.claim``)."""
    from diffcore.metrics import intervals

    def interval(d: dict) -> intervals.Interval:
        return intervals.Interval(d["value"], d["low"], d["high"], d["level"], d["method"], d["n"])

    by_name = {s["name"]: s for s in settings}
    out: dict = {}
    cond = by_name["net conditional"]
    if cond["accuracy"] is not None:
        acc = interval(cond["accuracy"])
        out["conditional_not_saturated"] = intervals.claim(
            acc.high < c.saturated_accuracy, accuracy=acc, below=c.saturated_accuracy
        )
        guided = [s for s in settings if s["guidance"] not in ("none", "unconditional")]
        for s in guided:
            if s["model"] == "gaussian":
                reference = by_name["gaussian conditional"]
            else:
                reference = cond
            a, r = interval(s["accuracy"]), interval(reference["accuracy"])
            out[f"raises_accuracy: {s['name']}"] = intervals.claim(
                intervals.clearly_above(a, r), accuracy=a, reference=r, reference_name=reference["name"]
            )
    full_cfg = [
        s for s in settings if s["model"] == "net" and s["guidance"] == "cfg" and s["low"] == 0 and s["high"] is None
    ]
    if full_cfg:
        strongest = max(full_cfg, key=lambda s: s["w"])
        a, r = interval(strongest["coverage"]), interval(cond["coverage"])
        out[f"lowers_coverage: {strongest['name']}"] = intervals.claim(
            intervals.clearly_below(a, r), coverage=a, conditional=r
        )
    everywhere = by_name.get(f"net cfg w={c.linear_scale:g}")
    for split in c.split_sigmas:
        low_only = by_name[f"net cfg w={c.linear_scale:g} sigma<={split:g}"]
        if everywhere is not None:
            a, r = interval(low_only["frechet"]), interval(everywhere["frechet"])
            out[f"low_sigma_cfg_cheaper: sigma<={split:g}"] = intervals.claim(
                intervals.clearly_below(a, r), frechet=a, everywhere=r
            )
    above = [r for r in transition if r["sigma"] > c.linear_low]
    for name in ("conditional", "guidance"):
        worst = max(above, key=lambda r: r[f"ratio_{name}_high"]) if above else None
        out[f"{name}_closer_to_gaussian_than_empirical_above_{c.linear_low:g}"] = intervals.claim(
            bool(above) and all(r[f"ratio_{name}_high"] < 1 for r in above),
            sigmas=len(above),
            worst_sigma=None if worst is None else worst["sigma"],
            worst_ratio_high=None if worst is None else worst[f"ratio_{name}_high"],
        )
    for row in cpc:
        out[f"cpc_overlap_above_random: sigma={row['sigma']:.4g}"] = intervals.claim(
            row["overlap_low"] > row["random_overlap"],
            overlap=intervals.Interval(
                row["overlap"],
                row["overlap_low"],
                row["overlap_high"],
                method="bootstrap",
                n=len(row["overlap_points"]),
            ),
            random=row["random_overlap"],
        )
    return out


EQUAL_ACCURACY_METRICS = ("frechet", "precision", "density", "coverage", "diversity")


def equal_accuracy_comparison(settings: list[dict], c: CFGConfig) -> dict:
    """Plain CFG against Jacobian CPC guidance at the class accuracy ``c.equal_accuracy`` (fixed
    before the runs): each method's curve (the conditional model as w = 0, then its sweep) is
    interpolated to that accuracy (:func:`diffcore.analysis.guidance.at_equal_accuracy`), and the
    Frechet distance, precision, density, coverage and diversity compared there. Returns
    ``{"target", "cfg", "jacobian_cpc", "claims"}`` (a method's entry None where its sweep does not
    reach the target; then the comparison claims do not hold, with ``reached`` saying why)."""
    from diffcore.analysis.guidance import at_equal_accuracy
    from diffcore.metrics import intervals

    everywhere = [s for s in settings if s["model"] == "net" and s["low"] == 0 and s["high"] is None]
    cond = [s for s in everywhere if s["guidance"] == "none"]
    out: dict = {"target": c.equal_accuracy, "claims": {}}
    if not cond or cond[0]["accuracy"] is None:
        out.update(cfg=None, jacobian_cpc=None)
        return out
    for method in ("cfg", "jacobian_cpc"):
        curve = cond + [s for s in everywhere if s["guidance"] == method]
        out[method] = at_equal_accuracy(curve, c.equal_accuracy, EQUAL_ACCURACY_METRICS)
    cfg, cpc = out["cfg"], out["jacobian_cpc"]
    reached = {"cfg": cfg is not None, "jacobian_cpc": cpc is not None}
    out["claims"]["jacobian_cpc_reaches_equal_accuracy"] = intervals.claim(
        reached["jacobian_cpc"], target=c.equal_accuracy, strengths=list(c.cpc_guidance_scales)
    )

    def interval(d: dict) -> intervals.Interval:
        return intervals.Interval(d["value"], d["low"], d["high"], method="interpolated")

    for metric, lower_is_better in (("frechet", True), ("precision", False), ("coverage", False), ("density", False)):
        both = cfg is not None and cpc is not None
        a = interval(cpc[metric]) if both else None
        b = interval(cfg[metric]) if both else None
        better = both and (intervals.clearly_below(a, b) if lower_is_better else intervals.clearly_above(a, b))
        worse = both and (intervals.clearly_above(a, b) if lower_is_better else intervals.clearly_below(a, b))
        word = "lower" if lower_is_better else "higher"
        out["claims"][f"jacobian_cpc_{word}_{metric}_than_cfg_at_equal_accuracy"] = intervals.claim(
            better, jacobian_cpc=a, cfg=b, cfg_clearly_better=worse, reached=reached, target=c.equal_accuracy
        )
    return out


def alignment_claims(rows: list[dict], c: CFGConfig) -> dict:
    """Whether the network's Jacobian CPC term points along the Gaussians' linear CPC term beyond a
    random direction's chance cosine (intervals over the probes), above and at or below
    ``linear_low``."""
    from diffcore.metrics import intervals

    out = {}
    for name, part in (
        (f"above_{c.linear_low:g}", [r for r in rows if r["sigma"] > c.linear_low]),
        (f"at_or_below_{c.linear_low:g}", [r for r in rows if r["sigma"] <= c.linear_low]),
    ):
        aligned = [r for r in part if r["cos_low"] > r["cos_random_high"]]
        out[f"jacobian_cpc_term_along_gaussian_cpc_term_{name}"] = intervals.claim(
            bool(part) and len(aligned) == len(part),
            sigmas=len(part),
            aligned_sigmas=len(aligned),
            cos_range=[min(r["cos"] for r in part), max(r["cos"] for r in part)] if part else None,
        )
    return out


# ----------------------------------------------------------------------------- transition analysis


def transition_curves(
    net, gaussians, images: torch.Tensor, labels: torch.Tensor, sigmas: list[float], c: CFGConfig, device
) -> list[dict]:
    """Relative distances of the trained denoisers to the Gaussian ones per sigma (module docstring;
    :func:`diffcore.analysis.guidance.transition_curves` with this config's probes)."""
    return guidance_measures.transition_curves(
        net, gaussians, images, labels, sigmas, samples_per_class=c.distance_samples, seed=c.probe_seed, device=device
    )


def cpc_measurements(
    net, gaussians, images: torch.Tensor, labels: torch.Tensor, sigmas: list[float], c: CFGConfig, device
) -> list[dict]:
    """Per-sample CPCs of the trained model vs the Gaussian CPCs of the same class, per sigma
    (:func:`diffcore.analysis.guidance.cpc_measurements` with this config's probes)."""
    return guidance_measures.cpc_measurements(
        net,
        gaussians,
        images,
        labels,
        sigmas,
        points=c.cpc_points,
        k=c.cpc_k,
        method=c.cpc_method,
        iters=c.cpc_iters or None,
        seed=c.probe_seed,
        device=device,
    )


def _spread(values: list[float], count: int) -> list[float]:
    """``count`` entries of ``values`` evenly spread (both ends included)."""
    if count >= len(values):
        return list(values)
    if count == 1:
        return [values[len(values) // 2]]
    return [values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)]


# ----------------------------------------------------------------------------- the study


class _Study:
    def __init__(self, config: CFGConfig, out, hooks: CFGHooks | None, device: str, progress: bool):
        self.c, self.ws, self.hooks, self.device, self.progress = config, base.Workspace(out), hooks, device, progress

    def data(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        from diffcore import data

        spec = {"name": self.c.dataset, **({"root": self.c.data_root} if self.c.data_root else {})}
        dataset = data.load_dataset(spec)
        images, labels = dataset.batch(torch.arange(len(dataset)))
        return images.float(), labels, dataset.num_classes

    def model_spec(self) -> dict:
        c = self.c
        return {
            "dataset": c.dataset,
            "data_root": c.data_root,
            "model_preset": c.model_preset,
            "width": c.width,
            "train_steps": c.train_steps,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "lr_warmup_images": c.lr_warmup_images,
            "ema_halflife_images": c.ema_halflife_images,
            "label_dropout": c.label_dropout,
            "augment": c.augment,
            "seed": c.train_seed,
            **base.data_digest(c.data_root),
        }

    def train(self, num_classes: int) -> base.Unit:
        from diffcore import train

        spec = self.model_spec()

        def produce(tmp: Path, work: Path):
            import shutil

            data = {"name": spec["dataset"], **({"root": spec["data_root"]} if spec["data_root"] else {})}
            model = {
                "name": "ddpmpp",
                "preset": spec["model_preset"],
                "model_channels": spec["width"],
                "label_dim": num_classes,
            }
            config = _stack.training_request(
                spec,
                work,
                self.device,
                self.progress,
                data=data,
                model=model,
                ema_halflife_images=spec["ema_halflife_images"],
                augment=spec["augment"],
                class_conditional=True,
                label_dropout=spec["label_dropout"],
            )
            result = train.train_from_config(config, resume="auto")
            shutil.copytree(result.checkpoint, tmp / "checkpoint")
            return {"final_loss": result.final_loss, "step": result.step}

        return self._unit("models", "conditional", spec, produce)

    def load_net(self, unit: base.Unit):
        from diffcore import train

        net = train.load_trained_model(unit.path / "checkpoint", which="ema").to(self.device).eval()
        return net.requires_grad_(False)

    def sample_set(
        self, setting: dict, model_unit: base.Unit, net, gaussians, labels: torch.Tensor, shape
    ) -> base.Unit:
        from diffcore import sampler

        c = self.c
        spec = {
            "model": model_unit.spec,
            "setting": setting,
            "label_order": "class-major",
            "samples_per_class": c.samples_per_class,
            "sample_seed_start": c.sample_seed_start,
            "solver": c.solver,
            "sampler_steps": c.sampler_steps,
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
        }
        if setting["guidance"] == "jacobian_cpc":
            spec["cpc_guidance_rank"] = c.cpc_guidance_rank
            if c.cpc_guidance_rank > 0:
                spec["cpc_guidance_iters"] = c.cpc_guidance_iters

        def produce(tmp: Path, work: Path):
            seeds = list(range(c.sample_seed_start, c.sample_seed_start + labels.shape[0]))
            chunks = []
            for start in range(0, len(seeds), c.sample_batch):
                chunk = labels[start : start + c.sample_batch]
                denoiser = guided_denoiser(
                    setting,
                    net,
                    gaussians,
                    chunk.to(self.device),
                    cpc_rank=c.cpc_guidance_rank,
                    cpc_iters=c.cpc_guidance_iters,
                )
                with torch.no_grad():
                    chunks.append(
                        sampler.sample(
                            denoiser,
                            seeds=seeds[start : start + c.sample_batch],
                            shape=shape,
                            **base.sampler_settings(c),
                            device=self.device,
                        )
                        .float()
                        .cpu()
                    )
            torch.save({"samples": torch.cat(chunks), "labels": labels}, tmp / "samples.pt")
            return {}

        return self._unit("samples", _slug(setting["name"]), spec, produce)

    def analysis(self, model_unit: base.Unit, net, gaussians, images, labels) -> base.Unit:
        from diffcore import sampler

        c = self.c
        spec = {
            "model": model_unit.spec,
            "measures": 3,
            "num_sigmas": c.num_sigmas,
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
            "distance_samples": c.distance_samples,
            "cpc_sigmas": c.cpc_sigmas,
            "cpc_points": c.cpc_points,
            "cpc_k": c.cpc_k,
            "cpc_method": c.cpc_method,
            "cpc_iters": c.cpc_iters,
            "probe_seed": c.probe_seed,
        }

        def produce(tmp: Path, work: Path):
            sigmas = sampler.karras_sigmas(c.num_sigmas, c.sigma_min, c.sigma_max, append_zero=False).tolist()
            curves = transition_curves(net, gaussians, images, labels, sigmas, c, self.device)
            cpc = cpc_measurements(net, gaussians, images, labels, _spread(sigmas, c.cpc_sigmas), c, self.device)
            spectra = {f"{s:.6g}": gaussians.contrastive_components(0, s)[0].tolist() for s in _spread(sigmas, 4)}
            return {"transition": curves, "cpc": cpc, "gaussian_spectra_class0": spectra}

        return self._unit("analysis", "transition", spec, produce)

    def alignment(self, model_unit: base.Unit, net, gaussians, images, labels) -> base.Unit:
        """The Jacobian CPC term against the Gaussians' linear CPC term on the analysis grid
        (:func:`diffcore.analysis.guidance.cpc_term_alignment`)."""
        from diffcore import sampler

        c = self.c
        spec = {
            "model": model_unit.spec,
            "num_sigmas": c.num_sigmas,
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
            "alignment_samples": c.alignment_samples,
            "probe_seed": c.probe_seed,
        }

        def produce(tmp: Path, work: Path):
            sigmas = sampler.karras_sigmas(c.num_sigmas, c.sigma_min, c.sigma_max, append_zero=False).tolist()
            rows = guidance_measures.cpc_term_alignment(
                net,
                gaussians,
                images,
                labels,
                sigmas,
                samples_per_class=c.alignment_samples,
                seed=c.probe_seed,
                device=self.device,
            )
            return {"rows": rows}

        return self._unit("analysis", "cpc-term-alignment", spec, produce)

    def _unit(self, kind, name, spec, produce) -> base.Unit:
        unit = self.ws.run_unit(kind, name, spec, produce)
        self.ws.record(unit)
        return unit

    def run(self) -> dict:
        from diffcore.denoisers import ClassGaussians

        c = self.c
        if c.dataset == "cifar10" and not c.data_root:
            raise base.ConfigError("data_root: cifar10 needs the local CIFAR-10 folder (--set data_root=...)")
        hooks = self.hooks if self.hooks is not None else default_hooks(c, self.device)
        images, labels, num_classes = self.data()  # loaded and checked before the folder is bound
        base.check_seed_range("sample_seed_start", c.sample_seed_start, num_classes * c.samples_per_class)
        self.ws.bind_config(c)
        model_unit = self.train(num_classes)
        net = self.load_net(model_unit)
        gaussians = ClassGaussians.fit(images.to(self.device), labels.to(self.device), num_classes)
        # class-major: one class per sampler batch where possible (the linear terms cache one
        # eigen-decomposition per class and sigma)
        sample_labels = torch.arange(num_classes).repeat_interleave(c.samples_per_class)
        shape = tuple(images.shape[1:])
        data_features = hooks.features(images)
        settings, grids = [], {}
        for setting in setting_list(c):
            unit = self.sample_set(setting, model_unit, net, gaussians, sample_labels, shape)
            stored = torch.load(unit.file("samples.pt"), weights_only=True)
            settings.append({**setting, **sample_metrics(stored["samples"], stored["labels"], hooks, data_features, c)})
            grids[setting["name"]] = _grid(stored["samples"], stored["labels"], num_classes, c.grid_per_class)
        analysis = self.analysis(model_unit, net, gaussians, images, labels).meta
        alignment = self.alignment(model_unit, net, gaussians, images, labels).meta["rows"]
        data_reference = {
            "accuracy": class_accuracy(images, labels, hooks),
            "diversity": per_class_diversity(images, labels),
        }
        claims = study_claims(settings, analysis["transition"], analysis["cpc"], c)
        comparison = equal_accuracy_comparison(settings, c)
        claims.update(alignment_claims(alignment, c))
        claims.update(comparison.pop("claims"))
        results = json.loads(
            base.json_dumps(
                {
                    "experiment": NAME,
                    "config": dataclasses.asdict(c),
                    "model": model_unit.meta,
                    "data": data_reference,
                    "convention": "D_c + w G (CFG: G = D_c - D_u); guidance acts for sigma in (low, high]",
                    "claims": claims,
                    "settings": settings,
                    "equal_accuracy": comparison,
                    "cpc_term_alignment": alignment,
                    **analysis,
                }
            )
        )
        self.write(results, grids)
        return results

    def write(self, results: dict, grids: dict) -> None:
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "settings.csv", [_flat_setting(s) for s in results["settings"]])
        base.atomic_write_csv(root / "transition.csv", results["transition"])
        plot_samples(results, grids, root / "cfg-samples.png")
        plot_metrics(results, root / "cfg-metrics.png")
        plot_cpc(results, root / "cfg-cpc.png")
        plot_transition(results, root / "cfg-transition.png")


def _flat_setting(setting: dict) -> dict:
    """A setting's row for settings.csv: intervals as ``name, name_low, name_high`` columns."""
    out = {}
    for key, value in setting.items():
        if isinstance(value, dict):
            out.update({key: value["value"], f"{key}_low": value["low"], f"{key}_high": value["high"]})
        else:
            out[key] = value
    return out


def _slug(name: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name.replace("<=", "le").replace(">", "gt"))
    return "-".join(part for part in out.split("-") if part)


def _grid(samples: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """``per_class`` samples of each class, class-major: [K * per_class, C, H, W]."""
    return torch.cat([samples[labels == cls][:per_class] for cls in range(num_classes)])


# ----------------------------------------------------------------------------- figures


def _pyplot():
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    return plt


def plot_samples(results: dict, grids: dict, path) -> Path:
    """One row per setting (label: name, accuracy, Frechet distance); columns: classes 0..K-1."""
    plt = _pyplot()
    settings = results["settings"]
    rows = [plotting.to_unit(grids[s["name"]]) for s in settings]
    grid = plotting.mosaic(rows)
    h, k = rows[0].shape[2] + 1, max(r.shape[0] for r in rows)
    labels_inches, image_inches = 3.4, 0.3 * k
    fig, ax = plt.subplots(figsize=(labels_inches + image_inches + 0.2, 0.3 * len(rows) + 0.7))
    image = grid.permute(1, 2, 0).numpy()
    ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * h + h / 2 - 1 for r in range(len(rows))])
    ax.set_yticklabels(
        [f"{s['name']}  (acc {_fmt(s['accuracy'])}, FD {_fmt(s['frechet'])})" for s in settings], fontsize=7
    )
    ax.set_title("same seeds in every row; columns: classes 0..9", fontsize=8)
    width = labels_inches + image_inches + 0.2
    fig.subplots_adjust(left=labels_inches / width, right=1 - 0.1 / width, top=0.93, bottom=0.02)
    return base.atomic_save_figure(fig, path)


def _fmt(value) -> str:
    if isinstance(value, dict):
        value = value["value"]
    return "n/a" if value is None else f"{value:.2f}"


def _value(value):
    """A metric's point value (an interval dict's ``value``, or the number itself)."""
    return value["value"] if isinstance(value, dict) else value


def _errors(values: list) -> list[list[float]] | None:
    """Matplotlib ``yerr`` of interval dicts (None for plain numbers)."""
    if not values or not isinstance(values[0], dict):
        return None
    return [[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]]


def plot_metrics(results: dict, path) -> Path:
    """Accuracy, Frechet distance, coverage and diversity of every set against w (bars: 95% intervals)."""
    plt = _pyplot()
    settings = results["settings"]
    keys = (
        ("accuracy", "class accuracy (Wilson 95%)"),
        ("frechet", "Frechet distance (feature space; bootstrap 95%)"),
        ("coverage", "coverage of the data (feature space, k=5)"),
        ("diversity", "per-class diversity (RMS/pixel)"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    curve = [
        s
        for s in settings
        if s["model"] == "net" and s["guidance"] in ("none", "cfg") and s["low"] == 0 and s["high"] is None
    ]
    jac = [s for s in settings if s["guidance"] == "jacobian_cpc" and s["low"] == 0 and s["high"] is None]
    others = [s for s in settings if s not in curve + jac and s["guidance"] != "unconditional"]
    markers = {"cfg": "s", "positive": "^", "negative": "v", "mean_shift": "D", "all": "*", "none": "o"}
    markers["jacobian_cpc"] = "d"
    for ax, (key, title) in zip(axes, keys):
        if any(s[key] is None for s in settings):
            ax.set_title(f"{title}: no classifier for this dataset", fontsize=9)
            continue
        ax.errorbar(
            [s["w"] for s in curve],
            [_value(s[key]) for s in curve],
            yerr=_errors([s[key] for s in curve]),
            fmt="k-o",
            capsize=2,
            label="net CFG (all sigma)",
        )
        if jac:
            jac_curve = [s for s in curve if s["guidance"] == "none"] + jac
            ax.errorbar(
                [s["w"] for s in jac_curve],
                [_value(s[key]) for s in jac_curve],
                yerr=_errors([s[key] for s in jac_curve]),
                fmt="-D",
                color="tab:red",
                capsize=2,
                label="net Jacobian CPC guidance (all sigma)",
            )
        for s in others:
            colour = "tab:blue" if s["model"] == "net" else "tab:orange"
            marker = markers[s["guidance"]]
            if s["guidance"] in ("cfg", "jacobian_cpc"):  # limited intervals: high or low sigma
                marker = ">" if s["high"] is None else "<"
            ax.errorbar(
                [s["w"]],
                [_value(s[key])],
                yerr=_errors([s[key]]),
                fmt=marker,
                color=colour,
                ms=6,
                capsize=2,
                label=s["name"],
                alpha=0.8,
            )
        uncond = [s for s in settings if s["guidance"] == "unconditional"]
        if uncond:
            ax.axhline(_value(uncond[0][key]), color="gray", ls=":", label="net unconditional")
        if results["data"].get(key) is not None:
            ax.axhline(results["data"][key], color="green", ls="--", lw=1, label="data")
        ax.set_xlabel("guidance strength w  (D_c + w G)")
        if key == "frechet" and all(_value(s[key]) > 0 for s in settings):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_cpc(results: dict, path) -> Path:
    from diffcore.experiments.plotting import finish

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    for key, spectrum in sorted(results["gaussian_spectra_class0"].items(), key=lambda kv: -float(kv[0])):
        axes[0].plot(range(1, len(spectrum) + 1), spectrum, ".-", label=f"sigma={float(key):.3g}")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xlabel("index (descending)")
    axes[0].set_ylabel("eigenvalue of W_c - W_u")
    axes[0].set_title("Gaussian CPC spectrum, class 0: + enhanced, - suppressed", fontsize=9)
    axes[0].legend(fontsize=7)
    for row in results["cpc"]:
        net = [sorted(v, reverse=True) for v in row["net_singular_values"]]
        gauss = [sorted(v, reverse=True) for v in row["gaussian_singular_values"]]
        k = len(net[0])
        mean = lambda rows, i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
        (line,) = axes[1].plot(
            range(1, k + 1), [mean(net, i) for i in range(k)], "o-", ms=3, label=f"net, sigma={row['sigma']:.3g}"
        )
        axes[1].plot(range(1, k + 1), [mean(gauss, i) for i in range(k)], "x--", color=line.get_color(), ms=4)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("index (descending)")
    axes[1].set_title("top singular values: net J_c - J_u (o) vs Gaussian |eigenvalues| (x)", fontsize=9)
    axes[1].legend(fontsize=6)
    cpc = results["cpc"]
    axes[2].plot([r["sigma"] for r in cpc], [r["overlap"] for r in cpc], "o-", label="net vs Gaussian top-k CPCs")
    axes[2].fill_between(
        [r["sigma"] for r in cpc], [r["overlap_low"] for r in cpc], [r["overlap_high"] for r in cpc], alpha=0.2, lw=0
    )
    axes[2].plot([r["sigma"] for r in cpc], [r["random_overlap"] for r in cpc], "k:", label="random subspaces (k/d)")
    axes[2].set_xscale("log")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_xlabel("sigma")
    axes[2].set_ylabel("subspace overlap (mean cos^2)")
    axes[2].set_title("top-k right singular vectors of J_c - J_u vs Gaussian CPCs (95% bands)", fontsize=9)
    axes[2].legend(fontsize=7)
    return finish(fig, path, axes, legend_fontsize=None)


def plot_transition(results: dict, path) -> Path:
    """Left: relative distance of the net to the Gaussian (solid) and to the empirical denoiser
    (dashed) per denoiser; middle: their ratio (below 1: closer to the linear model); right: the
    cosine of the two guidance directions. Bands: bootstrap 95% intervals over the probes."""
    from diffcore.experiments.plotting import finish

    plt = _pyplot()
    rows = results["transition"]
    sigmas = [r["sigma"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, colour in (("conditional", "C0"), ("unconditional", "C1"), ("guidance", "C2")):
        for suffix, style, what in (("", "o-", "Gaussian"), ("_empirical", "s--", "empirical")):
            key = f"dist_{name}{suffix}"
            # The empirical guidance D_c^E - D_u^E vanishes at small sigma (both return the nearest
            # training image), so its relative distance is unbounded there: drawn only where finite-sized.
            shown = [r for r in rows if r[f"{key}_high"] < 1e3]
            xs = [r["sigma"] for r in shown]
            axes[0].plot(xs, [r[key] for r in shown], style, ms=3, color=colour, label=f"{name}: vs {what}")
            axes[0].fill_between(
                xs, [r[f"{key}_low"] for r in shown], [r[f"{key}_high"] for r in shown], color=colour, alpha=0.15
            )
        key = f"ratio_{name}"
        axes[1].plot(sigmas, [r[key] for r in rows], "o-", ms=3, color=colour, label=name)
        axes[1].fill_between(
            sigmas, [r[f"{key}_low"] for r in rows], [r[f"{key}_high"] for r in rows], color=colour, alpha=0.2
        )
    axes[0].set_yscale("log")
    axes[0].set_ylabel("|net - reference| / |reference|")
    axes[1].axhline(1, color="k", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("|net - Gaussian| / |net - empirical|")
    axes[2].plot(sigmas, [r["cos_guidance"] for r in rows], "o-", ms=3, color="tab:green")
    axes[2].set_ylabel("mean cosine of D_c - D_u (net, Gaussian)")
    axes[2].set_ylim(-0.1, 1.05)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    return finish(
        fig,
        path,
        suptitle="the trained conditional model against the linear (Gaussian) and the memorizing (empirical) denoisers",
    )


# ----------------------------------------------------------------------------- entry points


STUDY = base.Study(NAME, CFGConfig, presets=PRESETS, make=base.standard_make(_Study))
run, run_preset = STUDY.run, STUDY.run_preset
