"""Multi-stage UNet: one shared encoder, one decoder per noise interval (docs/papers.md section 9).

Multi-stage, multi-decoder diffusion models (Zhang et al., CVPR 2024) split the noise range into
K intervals ("stages") ``[b_0=0, b_1), [b_1, b_2), ..., [b_{K-1}, inf)`` and give every stage its own
decoder on top of one shared mapping network and encoder. The paper's EDM CIFAR-10 model has three
stages with boundaries sigma = 2.5103 and 7.6577 and decoders of base width 192 / 128 / 16 (lowest
noise first) on a 128-wide encoder.

:class:`MultiStageUNet` is a :class:`~diffcore.models.unet.UNet` (same mapping network, encoder and
blocks, same ``forward(x, noise_labels, class_labels, augment_labels)``) whose decoder is chosen per
sample from its noise label, so one batch may mix stages. It is wrapped by the usual preconditioners
(``EDMPrecond`` etc.), which pass ``c_noise(sigma)`` rather than sigma; the stage boundaries are
therefore stored as noise labels (``label_boundaries``), which :func:`multistage_denoiser` computes
from sigma boundaries through the wrapper's own ``c_noise`` (increasing in sigma for EDM, VP and VE).
A label equal to a boundary belongs to the higher stage (c_noise is computed in x's dtype, so a
float32 sigma within rounding of a boundary may land on either side).

:class:`SeparateStageUNets` is the paper's other baseline ("separate" models, its Fig. 1b): one
whole UNet (mapping network, encoder and decoder) per stage, routed the same way; it shares
nothing. ``multistage_denoiser(..., shared_encoder=False)`` builds it.

With one stage the model computes exactly what a single UNet of the same config computes (same
parameters, renamed ``dec.* -> decoders.0.*``). Routing uses data-dependent indexing (a host sync),
so the multi-stage forward is not ``torch.func.vmap``-able; single-stage batches take one decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffcore.models.precond import Precond
from diffcore.models.presets import PRECONDITIONERS, unet_config
from diffcore.models.unet import UNet, UNetConfig, build_decoder, run_decoder


def _check_stages(
    widths: Sequence[int], label_boundaries: Sequence[float], *, name: str, models: str
) -> tuple[tuple[int, ...], list[float]]:
    """The K stage widths (argument ``name``, integers >= 1) and the K-1 label boundaries (finite,
    strictly increasing) of a K-stage model whose stages are ``models``, checked; as a tuple and a list."""
    channels = tuple(widths)
    if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"{name}: expected a non-empty sequence of integers >= 1, got {widths!r}")
    boundaries = [float(b) for b in label_boundaries]
    if len(boundaries) != len(channels) - 1:
        raise ValueError(
            f"label_boundaries: expected {len(channels) - 1} values for {len(channels)} {models}, got {len(boundaries)}"
        )
    if any(not math.isfinite(b) for b in boundaries) or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"label_boundaries: expected finite, strictly increasing values, got {boundaries}")
    return channels, boundaries


def _stage_indices(label_boundaries: torch.Tensor, noise_labels: torch.Tensor) -> torch.Tensor:
    """Stage index in [0, K) of each noise label: [B] -> [B] int64 (a boundary value goes up)."""
    bounds = label_boundaries.to(device=noise_labels.device, dtype=torch.float64)
    return torch.bucketize(noise_labels.detach().to(torch.float64), bounds, right=True)


def _route_by_stage(
    stage: torch.Tensor, num_stages: int, run_stage: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Each stage's rows through ``run_stage(k, rows) -> [len(rows), ...]`` (``stage``: [B] from
    :func:`_stage_indices`), gathered back in batch order: [B, ...]. Stages without rows are not run."""
    out = None
    for index in range(num_stages):
        rows = (stage == index).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        part = run_stage(index, rows)
        if out is None:
            out = part.new_zeros((stage.shape[0],) + part.shape[1:])
        out = out.index_copy(0, rows, part)  # out of place: gradients flow to every stage
    assert out is not None  # every row has a stage
    return out


class MultiStageUNet(UNet):
    """Shared encoder + ``len(decoder_channels)`` decoders; stage of sample i from ``noise_labels[i]``.

    ``config``: the encoder's (and mapping network's) :class:`UNetConfig`; every decoder uses it with
    ``model_channels`` replaced by its entry of ``decoder_channels`` (lowest-noise stage first).
    ``label_boundaries``: K-1 strictly increasing noise-label values separating the K stages.
    ``forward(x [B, C, R, R], noise_labels [B], ...) -> [B, out_channels, R, R]``.
    """

    def __init__(
        self,
        config: UNetConfig | None = None,
        *,
        decoder_channels: Sequence[int],
        label_boundaries: Sequence[float] = (),
        **fields,
    ):
        channels, boundaries = _check_stages(
            decoder_channels, label_boundaries, name="decoder_channels", models="decoders"
        )
        self._decoder_channels = channels  # read by _build_decoders during UNet.__init__
        super().__init__(config, **fields)
        self.decoder_channels = channels
        self.register_buffer("label_boundaries", torch.tensor(boundaries, dtype=torch.float64))

    @property
    def num_stages(self) -> int:
        return len(self.decoders)

    def _build_decoders(self, config: UNetConfig, width: int, skip_widths: list[int], block: dict) -> None:
        self.decoders = nn.ModuleList()
        self._stage_takes_skip: list[set[str]] = []
        for channels in self._decoder_channels:
            decoder, takes_skip = build_decoder(
                config.replace(model_channels=channels), width, skip_widths, self.out_channels, block
            )
            self.decoders.append(decoder)
            self._stage_takes_skip.append(takes_skip)

    def stage_of(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """Stage index in [0, K) of each noise label: [B] -> [B] int64 (a boundary value goes up)."""
        return _stage_indices(torch.as_tensor(self.label_boundaries), noise_labels)

    def _decode(self, x, skips, emb, noise_labels) -> torch.Tensor:
        if self.num_stages == 1:
            return run_decoder(self.decoders[0], self._stage_takes_skip[0], x, list(skips), emb)

        def run_stage(index: int, rows: torch.Tensor) -> torch.Tensor:
            takes_skip = self._stage_takes_skip[index]
            return run_decoder(self.decoders[index], takes_skip, x[rows], [s[rows] for s in skips], emb[rows])

        return _route_by_stage(self.stage_of(noise_labels), self.num_stages, run_stage)

    def stage_parameter_counts(self) -> list[int]:
        """Parameters used by a forward pass in each stage: shared (mapping + encoder) + its decoder."""
        shared = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("decoders."))
        return [shared + sum(p.numel() for p in d.parameters()) for d in self.decoders]


class SeparateStageUNets(nn.Module):
    """One whole :class:`UNet` per stage (no shared parameters); stage of sample i from ``noise_labels[i]``.

    ``config``: the UNets' :class:`UNetConfig`; UNet k uses ``model_channels = widths[k]`` (lowest
    noise first). ``forward(x [B, C, R, R], noise_labels [B], class_labels, augment_labels) ->
    [B, out_channels, R, R]``; a batch may mix stages (each stage's rows go through its UNet).
    """

    def __init__(self, config: UNetConfig | None = None, *, widths: Sequence[int], label_boundaries=(), **fields):
        super().__init__()
        widths, boundaries = _check_stages(widths, label_boundaries, name="widths", models="UNets")
        base = (config or UNetConfig()).replace(**fields)
        self.stages = nn.ModuleList(UNet(base.replace(model_channels=w)) for w in widths)
        first = self.stages[0]
        self.config, self.widths = base, widths
        self.img_resolution, self.in_channels, self.out_channels = (
            first.img_resolution,
            first.in_channels,
            first.out_channels,
        )
        self.label_dim, self.augment_dim = first.label_dim, first.augment_dim
        self.register_buffer("label_boundaries", torch.tensor(boundaries, dtype=torch.float64))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_of(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """Stage index in [0, K) of each noise label: [B] -> [B] int64 (a boundary value goes up)."""
        return _stage_indices(torch.as_tensor(self.label_boundaries), noise_labels)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        if self.num_stages == 1:
            return self.stages[0](x, noise_labels, class_labels, augment_labels)

        def run_stage(index: int, rows: torch.Tensor) -> torch.Tensor:
            return self.stages[index](
                x[rows],
                noise_labels[rows],
                None if class_labels is None else class_labels[rows],
                None if augment_labels is None else augment_labels[rows],
            )

        return _route_by_stage(self.stage_of(noise_labels), self.num_stages, run_stage)

    def stage_parameter_counts(self) -> list[int]:
        """Parameters used by a forward pass in each stage: that stage's UNet."""
        return [sum(p.numel() for p in unet.parameters()) for unet in self.stages]


def multistage_denoiser(
    preset: str = "ddpmpp-cifar",
    *,
    sigma_boundaries: Sequence[float],
    decoder_channels: Sequence[int],
    precond: str = "edm",
    precond_kwargs: dict | None = None,
    shared_encoder: bool = True,
    **overrides,
) -> Precond:
    """A preconditioned multi-stage denoiser ``D(x, sigma)`` (the single-model denoiser contract).

    ``preset``/``overrides``: the encoder's UNet config (``diffcore.models.unet_config``);
    ``sigma_boundaries``: K-1 increasing sigmas > 0 between the K stages (paper: (2.5103, 7.6577));
    ``decoder_channels``: K decoder base widths, lowest noise first (paper: (192, 128, 16));
    ``shared_encoder=False``: :class:`SeparateStageUNets`, K whole UNets of those widths instead.
    """
    if precond not in PRECONDITIONERS:
        raise ValueError(f"precond: expected one of {sorted(PRECONDITIONERS)}, got {precond!r}")
    sigmas = [float(s) for s in sigma_boundaries]
    if any(not (math.isfinite(s) and s > 0) for s in sigmas) or any(a >= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(
            f"sigma_boundaries: expected strictly increasing finite sigmas > 0, got {list(sigma_boundaries)}"
        )
    if len(sigmas) != len(tuple(decoder_channels)) - 1:
        raise ValueError(
            f"sigma_boundaries: expected {len(tuple(decoder_channels)) - 1} values for "
            f"{len(tuple(decoder_channels))} decoders, got {len(sigmas)}"
        )
    config = unet_config(preset, **overrides)
    placeholder = [float(i) for i in range(len(sigmas))]  # label boundaries, set below
    network: nn.Module = (
        MultiStageUNet(config, decoder_channels=decoder_channels, label_boundaries=placeholder)
        if shared_encoder
        else SeparateStageUNets(config, widths=tuple(decoder_channels), label_boundaries=placeholder)
    )
    denoiser = PRECONDITIONERS[precond](network, **(precond_kwargs or {}))
    labels = denoiser.coefficients(torch.tensor(sigmas, dtype=torch.float64))[3] if sigmas else torch.zeros(0)
    if (labels[1:] <= labels[:-1]).any():
        raise ValueError(f"precond: its c_noise is not increasing over sigma_boundaries {sigmas}")
    network.label_boundaries.copy_(labels.to(torch.float64))
    network.sigma_boundaries = tuple(sigmas)  # type: ignore[assignment]
    return denoiser
