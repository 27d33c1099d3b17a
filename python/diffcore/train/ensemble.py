"""Model ensembles: K models of one architecture trained in lockstep as one stacked computation.

``train_ensemble([config_1, ..., config_K])`` trains K members whose configs differ only in
``data`` (e.g. the subset size N), ``seed`` and ``out_dir`` (plus ``progress``). Each member keeps
everything a single run has: its own training subset, data order (``BatchOrder(seed)``), sigma /
noise / flip generator, Adam moments, EMA, ``out_dir`` with ``metrics.jsonl`` and checkpoints.
One step draws every member's batch exactly as :class:`~diffcore.train.trainer.Trainer` does,
stacks them ``[K, B, ...]``, and runs the loss, backward, Adam and EMA once for all members:
``torch.func.stack_module_state`` + ``functional_call`` + ``vmap`` (torch lowers a vmapped
convolution with per-member weights to one grouped convolution). Adam and the EMA are
elementwise, so the stacked update is the per-member update.

- Member checkpoints have exactly the single-model format (``step_*/model|ema|optimizer|rng``): a
  member loads with :func:`~diffcore.train.trainer.load_trained_model`, samples alone, or resumes
  alone with :func:`~diffcore.train.trainer.train_from_config`.
- Resume: every member continues from the newest step that all members have a checkpoint of; on
  the CPU a killed and resumed ensemble ends bitwise equal to an uninterrupted one.
- Against training alone: the same batches, noise and initial weights; the stacked forward and
  backward reassociate sums, so a member agrees with its single run to float rounding, not
  bitwise (tests: loss curves within 1e-4 relative over 100 steps).
- Global RNG (dropout): one stream for the whole ensemble, seeded with member 0's seed and saved
  in every member's checkpoint; a stacked call cannot draw member k's dropout masks from member
  k's own stream, so models with dropout are statistically, not numerically, equivalent to
  training alone. Single process only (no DDP), fp32 or bf16 (no fp16 gradient scaler).

``stacked_denoiser(models)`` and :func:`sample_ensemble` sample K models from the same per-sample
seeds with one stacked denoiser call per solver step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch.func import functional_call, stack_module_state, vmap

from diffcore._progress import Progress
from diffcore.ops._torch_compat import foreach_lerp_
from diffcore.train import ddp
from diffcore.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from diffcore.train.config import TrainConfig
from diffcore.train.loss import ema_beta
from diffcore.train.trainer import CHECKPOINTS_DIR, Trainer, TrainResult, make_optimizer

log = logging.getLogger(__name__)

# Config fields in which ensemble members may differ.
MEMBER_FIELDS = frozenset({"data", "seed", "out_dir", "progress"})


def check_members(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """The configs as TrainConfig, checked to be ensemble members (see :data:`MEMBER_FIELDS`)."""
    configs = [TrainConfig.from_dict(c) if isinstance(c, dict) else c for c in configs]
    if not configs:
        raise ValueError("configs: an ensemble needs at least one member config")
    first = configs[0].to_dict()
    for index, config in enumerate(configs[1:], start=1):
        differs = sorted(k for k, v in config.to_dict().items() if k not in MEMBER_FIELDS and v != first[k])
        if differs:
            raise ValueError(
                f"configs[{index}]: ensemble members may differ only in "
                f"{', '.join(sorted(MEMBER_FIELDS))}; it differs from configs[0] in {', '.join(differs)}"
            )
        if config.data.get("name") != configs[0].data.get("name"):
            raise ValueError(
                f"configs[{index}]: every member must train on the same dataset "
                f"(subsets may differ), got {config.data.get('name')!r} vs {configs[0].data.get('name')!r}"
            )
    out_dirs = [c.out_dir for c in configs]
    if len(set(out_dirs)) != len(out_dirs):
        raise ValueError(f"configs: every member needs its own out_dir, got {out_dirs}")
    if configs[0].precision == "fp16":
        raise ValueError("precision: ensembles train in fp32 or bf16 (fp16 needs one gradient scaler per member)")
    if configs[0].compile:
        raise ValueError("compile: not supported for ensembles (vmap of functional_call); set compile=False")
    return configs


def _common_resume_step(configs: Sequence[TrainConfig], resume: str) -> list[str]:
    """Per-member ``resume`` arguments: the checkpoint of the newest step all members have."""
    if resume != "auto":
        if resume == "never":
            return ["never"] * len(configs)
        raise ValueError(f"resume: ensembles take 'auto' or 'never', got {resume!r}")
    found = [dict(list_checkpoints(f"{c.out_dir}/{CHECKPOINTS_DIR}")) for c in configs]
    if not any(found):
        return ["never"] * len(configs)
    common = set.intersection(*(set(f) for f in found))
    if not common:
        raise CheckpointError(
            "ensemble members have no checkpoint step in common "
            f"({[sorted(f) for f in found]}); resume the members alone or clear their out_dirs"
        )
    step = max(common)
    return [str(f[step]) for f in found]


class EnsembleTrainer:
    """K :class:`Trainer` members advanced in lockstep by one stacked computation (module docstring)."""

    def __init__(self, configs: Sequence[TrainConfig], resume: str = "auto"):
        configs = check_members(configs)
        context = ddp.DistributedContext(device=ddp.resolve_device(configs[0].device))
        resumes = _common_resume_step(configs, resume)
        self.members = [Trainer(c, context, r) for c, r in zip(configs, resumes)]
        steps = {m.step for m in self.members}
        if len(steps) != 1:
            raise CheckpointError(f"ensemble members resumed at different steps {sorted(steps)}")
        self.config, self.device = configs[0], context.device
        self.step = steps.pop()
        if self.step == 0:
            Trainer._seed_global_rngs(self.config.seed)  # one global stream for the ensemble
        self.template = self.members[0].model
        self.loss_fn = self.members[0].loss_fn
        self._stack()

    @property
    def size(self) -> int:
        return len(self.members)

    # ---- stacking ------------------------------------------------------------------------
    def _stack(self) -> None:
        """Stack the members' weights, EMA weights and Adam moments into ``[K, ...]`` tensors and
        make every member's own tensors views of their slice (no copies per step or per save)."""
        models = [m.model for m in self.members]
        self.params, self.buffers = stack_module_state(models)  # name -> [K, ...] leaf tensors
        self.names = list(self.params)
        ema_models = [m.ema.ema_model for m in self.members]
        ema_params, _ = stack_module_state(ema_models)
        self.ema_params = {name: ema_params[name].detach() for name in self.names}
        for k, member in enumerate(self.members):
            for (name, p), (_, e) in zip(member.model.named_parameters(), member.ema.ema_model.named_parameters()):
                p.data = self.params[name].data[k]
                e.data = self.ema_params[name][k]
        self.optimizer = make_optimizer([self.params[name] for name in self.names], self.config)
        self._stack_optimizer_state()

    def _stack_optimizer_state(self) -> None:
        """Resumed members' Adam moments into the stacked optimizer's state."""
        member_states = [m.optimizer.state for m in self.members]
        for _name, stacked, *member_params in zip(
            self.names, self.optimizer.param_groups[0]["params"], *(m.model.parameters() for m in self.members)
        ):
            states = [s.get(p) for s, p in zip(member_states, member_params)]
            if any(st is None for st in states):
                continue
            self.optimizer.state[stacked] = {
                "step": states[0]["step"].clone(),
                "exp_avg": torch.stack([st["exp_avg"] for st in states]),
                "exp_avg_sq": torch.stack([st["exp_avg_sq"] for st in states]),
            }
        self._expose_optimizer_state()

    def _expose_optimizer_state(self) -> None:
        """Each member's optimizer state as views of the stacked one (what its checkpoint saves)."""
        lr = self.optimizer.param_groups[0]["lr"]
        for k, member in enumerate(self.members):
            member.optimizer.state.clear()
            for stacked, p in zip(self.optimizer.param_groups[0]["params"], member.model.parameters()):
                st = self.optimizer.state.get(stacked)
                if st:
                    member.optimizer.state[p] = {
                        "step": st["step"],
                        "exp_avg": st["exp_avg"][k],
                        "exp_avg_sq": st["exp_avg_sq"][k],
                    }
            member.optimizer.param_groups[0]["lr"] = lr

    # ---- one step ------------------------------------------------------------------------
    def _member_loss(self, params, buffers, x, sigma, noise, class_labels):
        def net(x_in, sigma_in, labels_in):
            return functional_call(self.template, (params, buffers), (x_in, sigma_in, labels_in))

        return self.loss_fn(net, x, sigma, noise, class_labels).mean()

    def step_once(self) -> torch.Tensor:
        """One optimizer step of every member; returns the members' losses ``[K]`` (detached)."""
        config, step = self.config, self.step
        batches = [m._draw_batch(step) for m in self.members]
        x, sigma, noise = (torch.stack([b[i] for b in batches]) for i in (0, 2, 3))
        labels = torch.stack([b[1] for b in batches]) if config.class_conditional else None
        self.members[0]._set_lr(step, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        with self.members[0].autocast():
            losses = vmap(
                self._member_loss, in_dims=(0, 0, 0, 0, 0, None if labels is None else 0), randomness="different"
            )(self.params, self.buffers, x, sigma, noise, labels)
        losses.sum().backward()  # members are independent: each gets its own gradient
        if config.grad_clip > 0:
            self._clip_member_gradients(config.grad_clip)
        self.optimizer.step()
        images_after = (step + 1) * config.batch_size
        beta = ema_beta(config.batch_size, images_after, config.ema_halflife_images, config.ema_rampup_ratio)
        with torch.no_grad():
            foreach_lerp_(
                [self.ema_params[n] for n in self.names], [self.params[n].detach() for n in self.names], 1.0 - beta
            )
        self.step += 1
        for member in self.members:
            member.step = self.step
        return losses.detach()

    def _clip_member_gradients(self, max_norm: float) -> None:
        """``clip_grad_norm_`` per member: each member's global gradient norm over its slices."""
        grads = [self.params[n].grad for n in self.names if self.params[n].grad is not None]
        norms = torch.stack([g.flatten(1).float().norm(dim=1) for g in grads]).norm(dim=0)  # [K]
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.reshape((-1,) + (1,) * (g.ndim - 1)).to(g.dtype))

    # ---- loop ----------------------------------------------------------------------------
    def save(self) -> None:
        """Every member's checkpoint of the current step, in the single-model format."""
        self._expose_optimizer_state()
        for member in self.members:
            member.save()

    def run(self, progress: Progress | None = None) -> list[TrainResult]:
        """Train every member to ``config.steps``; ``progress`` (optional) advances by K per step."""
        config = self.config
        own = progress is None
        if own:
            progress = Progress(
                config.steps * self.size,
                f"ensemble of {self.size}",
                "member-steps",
                initial=self.step * self.size,
                enabled=config.progress,
            )
        loss_sum, loss_count = torch.zeros(self.size, device=self.device), 0
        last = [None] * self.size
        window_start, window_step = time.perf_counter(), self.step
        for member in self.members:
            member.model.train()
        try:
            while self.step < config.steps:
                loss_sum += self.step_once()
                loss_count += 1
                progress.update(self.size)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    means = (loss_sum / loss_count).tolist()
                    for k, member in enumerate(self.members):
                        member._log_window(means[k], window_start, window_step)
                    last = means
                    loss_sum, loss_count = torch.zeros(self.size, device=self.device), 0
                    window_start, window_step = time.perf_counter(), self.step
                if self.members[0].checkpoint_due():
                    self.save()
        finally:
            if own:
                progress.close()
        return [m.result(latest_checkpoint(m.checkpoints_dir), last[k]) for k, m in enumerate(self.members)]


def train_ensemble(configs: Sequence[TrainConfig], resume: str = "auto") -> list[TrainResult]:
    """Train (or resume) the K member runs ``configs`` describe as one ensemble; returns one
    :class:`TrainResult` per member. ``resume``: 'auto' or 'never' (see the module docstring)."""
    return EnsembleTrainer(configs, resume).run()


# ----------------------------------------------------------------------------- sampling


class StackedDenoiser(torch.nn.Module):
    """K models of one architecture as one denoiser over member-major groups: ``x [B * K, ...]``
    holds, for each of B samples, its K member copies consecutively (sample b, member k at row
    ``b K + k``); every member denoises its rows in one vmapped call."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("models: need at least one model")
        self.size = len(models)
        self.template = models[0]
        params, buffers = stack_module_state(list(models))
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = buffers

    def _one(self, params, buffers, x, sigma):
        return functional_call(self.template, (params, buffers), (x, sigma))

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x: [B * K, ...], sigma: float, 0-d or [B * K] -> x0_hat [B * K, ...]."""
        if x.shape[0] % self.size:
            raise ValueError(f"x: batch {x.shape[0]} is not a multiple of the {self.size} members")
        groups = x.shape[0] // self.size
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        per_member = lambda t: t.reshape(groups, self.size, *t.shape[1:]).transpose(0, 1)  # noqa: E731
        out = vmap(self._one, randomness="different")(self.params, self.buffers, per_member(x), per_member(sigma))
        return out.transpose(0, 1).reshape(x.shape)


def stacked_denoiser(models: Sequence[torch.nn.Module]) -> StackedDenoiser:
    """:class:`StackedDenoiser` of ``models`` (put them in eval mode first)."""
    return StackedDenoiser(models)


def sample_ensemble(
    models: Sequence[torch.nn.Module],
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    batch_size: int | None = None,
    **sample_options,
) -> torch.Tensor:
    """Samples ``[K, len(seeds), *shape]``: member k's samples from the same per-sample seeds as
    every other member, with one stacked denoiser call per solver evaluation. ``batch_size``: seeds
    per call (all at once by default); ``sample_options`` go to :func:`diffcore.sampler.sample`."""
    from diffcore import sampler

    denoiser = stacked_denoiser(models)
    k = denoiser.size
    repeated = [int(s) for s in seeds for _ in range(k)]  # sample b's K copies side by side
    with torch.no_grad():
        out = sampler.sample(
            denoiser,
            seeds=repeated,
            shape=tuple(shape),
            batch_size=None if batch_size is None else batch_size * k,
            **sample_options,
        )
    return out.reshape(len(seeds), k, *out.shape[1:]).transpose(0, 1)
