"""The experiment framework: configs with presets, atomic writes, and resumable units.

An experiment writes everything under one output folder::

    OUT/diffcore-run.json      the kind of run (the experiment's name; another kind is refused)
    OUT/config.json            the resolved config (a rerun with a different config is refused)
    OUT/units/<kind>/<name>/   finished units: a trained model, a sample set, a metric ...
    OUT/work/<kind>/<name>/    scratch of unfinished units (e.g. a trainer's checkpoints)
    OUT/results.json, *.csv, *.png

A unit is *finished* when its folder holds ``MANIFEST.json`` listing every file with its size and
SHA-256 and the unit's ``spec`` (the parameters that define it, with the content digest of every
file it depends on: :func:`file_digest`, :func:`folder_digest`; a unit whose files were replaced
since is made again). A unit is produced in a temporary
folder and moved into place with one ``os.replace`` after its manifest is written, so a killed run
leaves either a finished unit or none; a finished unit whose files no longer match the manifest is
an error, never silently reused. Single files (results, figures) are written to a temporary file in
the same folder and ``os.replace``-d over the target.

A run holds the folder with :meth:`Workspace.claim` (see :mod:`diffcore._folder`): one run at a
time (a second one waits or exits naming the holder), temporaries of killed runs removed, a folder
of another kind refused; the config is validated before it is bound.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from diffcore import _env, _folder
from diffcore._atomic import atomic_write_bytes, temporary_folder  # atomic_write_bytes: re-exported for the studies
from diffcore._digest import file_digest, folder_digest  # noqa: F401  (re-exported: units keyed on content)
from diffcore._files import FileReadError, load_json
from diffcore.sampler.noise import SEED_MAX

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"


# ----------------------------------------------------------------------------- atomic writes


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples, paths, tensors and numpy scalars as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    return value


def _non_finite_path(value: Any, path: str = "") -> str | None:
    """The path (``models[3].gl``) of the first NaN or infinity in a JSON-able value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(the value)"
    if isinstance(value, Mapping):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for p, v in items if (found := _non_finite_path(v, p)) is not None), None)


def json_dumps(value: Any) -> str:
    """Strict JSON (sorted keys, indented): a NaN or infinity raises ValueError naming where it is
    (missing values are None, written as null)."""
    value = to_jsonable(value)
    where = _non_finite_path(value)
    if where is not None:
        raise ValueError(f"refusing to write a non-finite number as JSON: {where} is not finite")
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_bytes(path, json_dumps(value).encode())


def atomic_write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None
) -> Path:
    """Rows of dicts as CSV; columns default to the union of keys in first-seen order."""
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: to_jsonable(row.get(k, "")) for k in columns})
    return atomic_write_bytes(path, buf.getvalue().encode())


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- content digests
# Units are keyed on the content of the files they depend on (a descriptor, a data folder): a
# spec records ``"sha256"`` (or ``"<what>_sha256"``) beside a path, and a finished unit whose
# spec differs from the wanted one only in such digests was made from files that have since
# been replaced, so it is made again (see :meth:`Workspace.finished`).


def _without_digests(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: None if str(k).endswith("sha256") else _without_digests(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_digests(v) for v in value]
    return value


def replaced_files(found: Any, wanted: Any) -> bool:
    """Whether spec ``found`` differs from ``wanted`` only in content digests (its files changed)."""
    return found != wanted and _without_digests(found) == _without_digests(wanted)


def data_digest(root: str) -> dict:
    """``{"data_sha256": ...}``, the content digest of the data folder ``root`` (``{}`` without one):
    a unit trained or measured on it is keyed on the data, not the path."""
    return {"data_sha256": folder_digest(root)} if root else {}


# ----------------------------------------------------------------------------- configs and presets


class ConfigError(ValueError):
    """A config, preset or override that cannot be applied."""


def _parse_scalar(text: str, kind: Any, key: str) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}: expected a boolean, got {text!r}")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError as exc:
            raise ConfigError(f"--set {key}: expected {kind.__name__}, got {text!r}") from exc
    raise ConfigError(f"--set {key}: cannot parse a value of type {kind!r}")


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` as a value of the field type ``annotation`` (int, float, str, bool,
    ``X | None``, ``tuple[X, ...]`` as comma-separated values)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        if text.strip().lower() in ("none", "null", "") and len(non_none) < len(args):
            return None
        return parse_value(text, non_none[0], key)
    if origin in (tuple, list):
        item = args[0] if args else str
        parts = [p for p in text.split(",") if p.strip() != ""]
        return tuple(_parse_scalar(p.strip(), item, key) for p in parts)
    return _parse_scalar(text, annotation, key)


# ----------------------------------------------------------------------------- one vocabulary
# Every study names a setting the same way: train_steps (training steps), sampler_steps (sampler
# steps), learning_rate, batch_size (training batch), sample_batch (sampler batch),
# sample_seed_start, threshold, torch_threads. The names a study used before are its aliases:
# ``--set OLD=...`` and an output folder's config.json written with the old names keep working
# (with a deprecation message). A name that is a field of the study's config always means that
# field (watermark's old ``batch_size`` was its sampler batch, now ``sample_batch``).
RENAMED_FIELDS: dict[str, dict[str, str]] = {
    "demo": {"steps": "sampler_steps"},
    "pfd": {"steps": "train_steps", "lr": "learning_rate"},
    "molrg": {"gl_threshold": "threshold"},
    "watermark": {
        "steps": "sampler_steps",
        "seed_start": "sample_seed_start",
        "train_batch_size": "batch_size",
        "batch_size": "sample_batch",
    },
    "multistage": {"cpu_threads": "torch_threads"},
}


def study_of_config(config: Any) -> str | None:
    """The registry name of the study whose config class ``config`` is (None: no study's)."""
    from diffcore.experiments import EXPERIMENTS

    module = type(config).__module__
    return next((name for name, path in EXPERIMENTS.items() if path == module), None)


def current_field_name(study: str | None, key: str, fields: Iterable[str]) -> str:
    """``key`` as the study names it now: a current field as is, an old name (RENAMED_FIELDS) as
    its new one, with a deprecation message; anything else unchanged (the caller rejects it)."""
    fields = set(fields)
    new = RENAMED_FIELDS.get(study or "", {}).get(key)
    if key in fields or new is None:
        return key
    log.warning(
        "%s: %r is the old name of %r (deprecated; one vocabulary across studies); use %r", study, key, new, new
    )
    return new


def upgrade_stored_config(study: str | None, stored: Mapping[str, Any], fields: Iterable[str]) -> dict:
    """A config.json written with a study's old field names, with the current names (all old names
    at once, so renames that chain, like watermark's batch sizes, stay apart); a config that holds
    no old-only name is returned unchanged."""
    renames = RENAMED_FIELDS.get(study or "", {})
    fields = set(fields)
    if not any(key in renames and key not in fields for key in stored):
        return dict(stored)
    log.warning(
        "%s: this folder's config.json uses old field names (%s); reading them as %s",
        study,
        ", ".join(sorted(k for k in stored if k in renames)),
        ", ".join(renames[k] for k in sorted(stored) if k in renames),
    )
    return {renames.get(key, key): value for key, value in stored.items()}


def apply_overrides(config: Any, overrides: Iterable[str]) -> Any:
    """A copy of the dataclass ``config`` with ``key=value`` overrides (``--set`` on the CLI; a
    study's old field names are accepted with a deprecation message, :data:`RENAMED_FIELDS`)."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    study = study_of_config(config)
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = current_field_name(study, key.strip(), names)
        if key not in names:
            raise ConfigError(f"--set {key}: unknown key; known keys: {', '.join(sorted(names))}")
        changes[key] = parse_value(text, hints[key], key)
    return dataclasses.replace(config, **changes)


def config_from_preset(presets: Mapping[str, Callable[[], Any]], preset: str, overrides: Iterable[str] = ()) -> Any:
    """The preset with ``overrides`` applied, validated (its ``validate()``, when it has one)."""
    if preset not in presets:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(presets)}")
    config = apply_overrides(presets[preset](), overrides)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def sampler_settings(config: Any) -> dict:
    """The sampler settings of a study's config as the keywords of ``diffcore.sampler.sample`` (and
    of a study hook's ``sample``): ``steps`` (its ``sampler_steps``), ``solver``, ``sigma_min``,
    ``sigma_max``."""
    return {
        "steps": config.sampler_steps,
        "solver": config.solver,
        "sigma_min": config.sigma_min,
        "sigma_max": config.sigma_max,
    }


# ----------------------------------------------------------------------------- field ranges
# A check is ``check(name, value)`` raising ConfigError("name: expected ..., got ...").

Check = Callable[[str, Any], None]


def _fail(name: str, expected: str, value: Any) -> None:
    raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _bounds(lo, hi, lo_open: bool = False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}]"


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An int in [lo, hi] (None: unbounded on that side)."""

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(name, "an integer", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            _fail(name, "an integer " + (_bounds(lo, hi) if lo is not None else f"<= {hi}"), value)

    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
    """A finite real number in [lo, hi] (or (lo, hi] with ``lo_open``)."""

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(name, "a finite number", value)
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if low_bad or (hi is not None and value > hi):
            _fail(name, "a finite number " + (_bounds(lo, hi, lo_open) if lo is not None else f"<= {hi}"), value)

    return check


def one_of(*choices: Any) -> Check:
    def check(name, value):
        if value not in choices:
            _fail(name, "one of " + ", ".join(map(str, choices)), value)

    return check


def text(name: str, value: Any) -> None:
    """Any string (a path, a name checked where it is used)."""
    if not isinstance(value, str):
        _fail(name, "a string", value)


def optional(inner: Check) -> Check:
    """None or a value ``inner`` accepts."""

    def check(name, value):
        if value is not None:
            inner(name, value)

    return check


def tuple_of(inner: Check, min_len: int = 1) -> Check:
    """A tuple of at least ``min_len`` distinct values, each accepted by ``inner``."""

    def check(name, value):
        if not isinstance(value, tuple) or len(value) < min_len:
            _fail(name, f"at least {min_len} comma-separated value{'s' if min_len != 1 else ''}", value)
        if len(set(value)) != len(value):
            _fail(name, "distinct values", value)
        for i, item in enumerate(value):
            inner(f"{name}[{i}]", item)

    return check


seed = integer(0, SEED_MAX)
fraction = number(0, 1, lo_open=True)  # a share or a probability that must not be 0: (0, 1]
positive = integer(1)  # a count or size that must not be 0
count = integer(0)  # a count that may be 0 (0: none)
positive_number = number(0, lo_open=True)  # a finite real number > 0 (a scale, a rate)


def boolean(name: str, value: Any) -> None:
    """True or False (not 0 / 1)."""
    if not isinstance(value, bool):
        _fail(name, "a boolean (true or false)", value)


def below(hi: float) -> Check:
    """A finite number in the open interval (0, hi)."""

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < hi:
            _fail(name, f"a finite number in (0, {hi:g})", value)

    return check


def registered(module: str, attr: str) -> Check:
    """One of the names of the registry ``module.attr`` (a dict or tuple), imported when checked
    (the registries' modules load torch code)."""

    def check(name, value):
        import importlib

        one_of(*getattr(importlib.import_module(module), attr))(name, value)

    return check


solver = registered("diffcore.sampler", "SOLVERS")  # a sampler of diffcore.sampler
model_preset = registered("diffcore.models", "PRESETS")  # a UNet preset of diffcore.models

# Noise levels a study accepts. Samples, images and trajectories are float32: at sigma = 1e4 one
# rounding step of x (sigma * 2^-24 ~ 6e-4) is still below an 8-bit pixel level (2/255) of an
# image in [-1, 1]; far above it the image is lost in the rounding of x and a run ends with
# garbage (sigma_max = 1e12 did). Below 1e-5 the remaining noise comes within about two orders
# of magnitude of float32's resolution of pixels near 1 (6e-8), where sampler steps stop changing x.
SIGMA_LOWEST, SIGMA_HIGHEST = 1e-5, 1e4


def _range_check(lo: float, hi: float, why: str) -> Check:
    inner = number(lo, hi)

    def check(name, value):
        try:
            inner(name, value)
        except ConfigError as err:
            raise ConfigError(f"{err} ({why})") from None

    return check


_SIGMA_WHY = (
    f"noise levels are bounded to [{SIGMA_LOWEST:g}, {SIGMA_HIGHEST:g}]: float32 samples lose the image beyond them"
)
sigma = _range_check(SIGMA_LOWEST, SIGMA_HIGHEST, _SIGMA_WHY)
"""A noise level sigma in [SIGMA_LOWEST, SIGMA_HIGHEST]."""


def _zero_or(inner: Check) -> Check:
    def check(name, value):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
            inner(name, value)

    return check


optional_sigma = _zero_or(sigma)
"""0 (off) or a noise level in [SIGMA_LOWEST, SIGMA_HIGHEST]."""
log_sigma = _range_check(math.log(SIGMA_LOWEST), math.log(SIGMA_HIGHEST), f"a mean of ln sigma; {_SIGMA_WHY}")
"""The mean of a log-normal noise-level distribution, ln sigma in [ln SIGMA_LOWEST, ln SIGMA_HIGHEST]."""


# The shared vocabulary's checks: a field of this name means the same thing in every study and is
# checked the same way. :func:`check_fields` applies them to every field a study's own table does
# not declare; a study declares a field of this name only where it needs another bound (its table
# says why in a comment), or where it gives the name another meaning.
VOCABULARY_CHECKS: dict[str, Check] = {
    # data
    "dataset": registered("diffcore.data.registry", "DATASET_NAMES"),  # a dataset diffcore.data loads
    "data_root": text,  # the folder of a dataset read from disk ("": none)
    "subset_seed": seed,  # the permutation of the nested training subsets
    # training sets hold two or more images: a nearest-neighbour ratio d1 / d2 needs two
    "num_train": integer(2),
    "sizes": tuple_of(integer(2)),
    # models and their training
    "models_from": text,  # a finished run whose models are measured ("": train them)
    "model_preset": model_preset,
    "width": positive,  # a UNet's base channels
    "widths": tuple_of(positive),
    "train_seed": seed,
    "train_seeds": tuple_of(seed),
    "train_steps": positive,
    "batch_size": positive,  # the training batch
    "learning_rate": number(0, 1, lo_open=True),  # Adam's step size; above 1 is a slip, not a setting
    "lr_warmup_images": count,  # images of the linear learning-rate ramp (0: none)
    "precond": registered("diffcore.experiments._stack", "PRECONDITIONINGS"),
    "augment_p": number(0, 1),  # EDM's non-leaky augmentation probability (0: off)
    "label_dropout": below(1),  # share of training labels dropped (classifier-free guidance)
    "sigma_p_mean": log_sigma,  # training noise levels: ln sigma ~ N(sigma_p_mean, sigma_p_std^2)
    "sigma_p_std": positive_number,
    "P_mean": log_sigma,  # molrg's and pfd's names of sigma_p_mean and sigma_p_std
    "P_std": positive_number,
    "sigma_log_uniform": number(0, 1),  # share of training noise levels drawn log-uniform
    # the MoLRG data (a mixture of low-rank Gaussians) and its MLP denoisers
    "num_components": positive,
    "ambient_dim": positive,
    "latent_dim": positive,
    "mlp_width": positive,
    "mlp_depth": positive,
    # sampling
    "num_samples": positive,
    "sample_seed_start": seed,  # samples use seeds sample_seed_start .. + num_samples - 1
    "sampler_steps": positive,
    "solver": solver,
    "sigma_min": sigma,
    "sigma_max": sigma,
    "sample_batch": positive,  # the sampler's batch
    # measures
    "similarity": text,  # cosine | l2 | sscd:PATH | raw:PATH, checked where it is loaded
    "threshold": optional(number(-1, 1)),  # a similarity threshold (every similarity lies in [-1, 1]; None: calibrated)
    "num_sigmas": positive,  # points of a noise-level grid
    "probe_seed": seed,
    "control_seed": seed,
    "attack_seed": seed,
    "inception_weights": text,  # FID's Inception-v3 weights file ("": none)
    "grid_samples": count,  # samples shown per figure grid (0: none)
    # runtime
    "torch_threads": count,  # intra-op CPU threads (0: torch's default)
}


def field_checks(config: Any, checks: Mapping[str, Check]) -> dict[str, Check]:
    """The check of every field of the dataclass ``config``: ``checks[field]`` (the study's table)
    or else :data:`VOCABULARY_CHECKS` ``[field]``; TypeError naming the fields that have neither."""
    names = [f.name for f in dataclasses.fields(config)]
    missing = [n for n in names if n not in checks and n not in VOCABULARY_CHECKS]
    if missing:
        raise TypeError(f"{type(config).__name__}: no range declared for {', '.join(missing)}")
    return {n: checks[n] if n in checks else VOCABULARY_CHECKS[n] for n in names}


def check_fields(config: Any, checks: Mapping[str, Check]) -> None:
    """Run on every field of the dataclass ``config`` its check (:func:`field_checks`: the study's
    table ``checks``, else the shared :data:`VOCABULARY_CHECKS`; every field needs one)."""
    for name, check in field_checks(config, checks).items():
        check(name, getattr(config, name))


def check_seed_range(start_name: str, start: int, count: int) -> None:
    """Seeds ``start .. start + count - 1`` must all be valid seeds."""
    if start + count - 1 > SEED_MAX:
        raise ConfigError(f"{start_name}: seeds {start} .. {start + count - 1} exceed the largest seed {SEED_MAX}")


def check_sigmas(sigma_min: float, sigma_max: float) -> None:
    if not sigma_min < sigma_max:
        raise ConfigError(f"sigma_min: expected sigma_min < sigma_max, got {sigma_min} and {sigma_max}")


# ----------------------------------------------------------------------------- sharded runs

SHARD_VAR = _env.SHARD_VAR


@dataclasses.dataclass(frozen=True)
class Participation:
    """This process's part in a run: ``index`` of ``count`` processes (a plain run: 0 of 1).

    ``distributed``: torchrun ranks, which meet at :meth:`barrier` before rank 0 aggregates;
    otherwise ``--shard I/N`` processes (a batch scheduler's job array), after which a plain run
    aggregates. Either way every process produces the units no other process is producing."""

    index: int = 0
    count: int = 1
    distributed: bool = False

    @property
    def alone(self) -> bool:
        return self.count == 1

    @property
    def aggregates(self) -> bool:
        """Whether this process writes the results (a plain run, or rank 0 after the barrier)."""
        return self.alone or (self.distributed and self.index == 0)

    def describe(self) -> str:
        return f"{'rank' if self.distributed else 'shard'} {self.index}/{self.count}"

    def barrier(self) -> None:
        """All ranks meet; rank 0 speaks last. After ``dist.barrier()`` a rank other than 0 may
        return and exit at once, and with gloo its closing socket can reset a connection whose
        last message rank 0 has not read yet (rank 0 then fails inside the barrier). A broadcast
        from rank 0 afterwards means no rank leaves before rank 0 has finished the barrier, and
        rank 0's last act is a send, which needs nothing back."""
        if self.distributed:
            import torch
            import torch.distributed as dist

            dist.barrier()
            dist.broadcast(torch.zeros(1), src=0)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; ConfigError naming --shard otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard: expected I/N with 0 <= I < N, got {text!r}")
    return index, count


def participation() -> Participation:
    """This process's part, from ``DIFFCORE_SHARD=I/N`` (``--shard``) or torchrun's WORLD_SIZE
    and RANK (a gloo process group is initialized for the barrier when there is none)."""
    shard = os.environ.get(SHARD_VAR, "").strip()
    world = _launcher_count("WORLD_SIZE", "1")
    if shard and world > 1:
        raise ConfigError("--shard: not under torchrun (the ranks already split the work)")
    if shard:
        return Participation(*parse_shard(shard))
    if world <= 1:
        return Participation()
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={world} is set but RANK is not: start the processes with torchrun "
                "(it sets both), or unset WORLD_SIZE"
            )
        rank = _launcher_count("RANK", "0")
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
        # torn down before the interpreter's own teardown: a gloo group destroyed during interpreter
        # shutdown can abort the process ("terminate called without an active exception", seen once
        # in the two-rank test after a complete run)
        atexit.register(_destroy_process_group)
    return Participation(dist.get_rank(), dist.get_world_size(), distributed=True)


def _destroy_process_group() -> None:
    """Destroy the default process group this module created, if it still exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _launcher_count(name: str, default: str) -> int:
    """An integer a launcher sets in the environment (torchrun's WORLD_SIZE, RANK), or ConfigError."""
    text = os.environ.get(name, default).strip() or default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer >= 0 (as torchrun sets it), got {text!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: expected an integer >= 0 (as torchrun sets it), got {text!r}")
    return value


# ----------------------------------------------------------------------------- the study contract


@dataclasses.dataclass(frozen=True)
class Study:
    """What a study declares about how it runs: its module's ``STUDY``, read by :func:`run_study`
    and by the ``diffcore`` command (which knows no study by name).

    - ``name``: the run kind (``diffcore run NAME``; an output folder holds runs of one kind);
    - ``config_class``: the config dataclass ``run`` takes;
    - ``cpu_only``: the study runs on the CPU alone (``--device cuda`` is an error, never ignored);
    - ``threads``: torch threads on the CPU when the config has no ``torch_threads`` field (0: torch's default);
    - ``takes_hooks``: whether ``run(..., hooks=)`` accepts stand-ins (else passing hooks is an error);
    - ``spreads``: whether its units spread over ``--shard I/N`` processes or torchrun ranks
      (every other study refuses to run under either);
    - ``one_process``: a unit (a model's training) runs in this process alone under torchrun;
    - ``summary(results, out) -> [lines]``: what the command prints after a run (None: the results path);
    - ``presets``: the module's ``PRESETS`` (name -> config factory), for :meth:`run_preset`;
    - ``make(request) -> study``: the study object of one run (a :class:`RunRequest`); the object
      has the run's :class:`Workspace` at ``.ws`` and ``run() -> results``. With ``make`` the module
      needs no entry points of its own: ``run, run_preset = STUDY.run, STUDY.run_preset``.
    """

    name: str
    config_class: type
    cpu_only: bool = False
    threads: int = 0
    takes_hooks: bool = True
    spreads: bool = False
    one_process: bool = False
    summary: Callable[[dict, Path], list[str]] | None = None
    presets: Mapping[str, Callable[[], Any]] | None = dataclasses.field(default=None, compare=False, repr=False)
    make: Callable[[RunRequest], Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def run(self, config: Any, out, *, hooks: Any = None, device: str = "auto", progress: bool = True) -> dict:
        """Run (or resume) the study into ``out`` (:func:`run_study`, the study built by ``make``);
        returns results.json's content (``{}`` from a process of a sharded run that does not
        aggregate). ``hooks``: stand-ins for the study's stack (None: its defaults); ``device``:
        ``auto``, ``cpu`` or ``cuda``; ``progress``: progress bars."""
        make = self.make
        if make is None:
            raise TypeError(f"Study {self.name!r} declares no make(); its module defines run() itself")
        return run_study(
            self,
            config,
            out,
            lambda given, resolved, part: make(RunRequest(config, out, given, resolved, part, progress)),
            hooks=hooks,
            device=device,
        )

    def run_preset(self, preset: str, out, overrides: Iterable[str] = (), **kwargs) -> dict:
        """:meth:`run` on the preset ``preset`` with ``overrides`` (``key=value``) applied."""
        if self.presets is None:
            raise TypeError(f"Study {self.name!r} declares no presets")
        return self.run(config_from_preset(self.presets, preset, overrides), out, **kwargs)


def standard_make(
    study_class: Callable[..., Any], *, hooks: bool = True, default_hooks: Callable[[], Any] | None = None
) -> Callable[[RunRequest], Any]:
    """The :attr:`Study.make` of a study class built the way docs/adding-a-study.md shows:
    ``study_class(config, out, hooks, device, progress)`` (``hooks``: the caller's, or
    ``default_hooks()`` when the caller passed None and a default is given), or
    ``study_class(config, out, device, progress)`` with ``hooks=False`` (a study that takes none)."""
    if not hooks:
        return lambda r: study_class(r.config, r.out, r.device, r.progress)
    if default_hooks is None:
        return lambda r: study_class(r.config, r.out, r.hooks, r.device, r.progress)
    return lambda r: study_class(r.config, r.out, r.hooks or default_hooks(), r.device, r.progress)


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """One call of a study's ``run``, as :attr:`Study.make` receives it: the validated ``config``,
    the output folder ``out``, the caller's ``hooks`` (None: the study's defaults), the resolved
    ``device`` (:func:`study_device`), this process's :class:`Participation` and ``progress``."""

    config: Any
    out: Any
    hooks: Any
    device: str
    part: Participation
    progress: bool


def study_device(study: Study, device: str, stand_ins: bool) -> str:
    """The device a study runs on, by one rule: a CPU-only study runs on the CPU and refuses any
    other; with stand-in hooks ``auto`` is the CPU (closed-form stand-ins run there); otherwise
    ``diffcore.train``'s resolution (``auto``: CUDA when present; this rank's GPU under torchrun)."""
    if study.cpu_only:
        if str(device) not in ("auto", "cpu"):
            raise ConfigError(f"--device: the {study.name} study runs only on the CPU, got {device!r}")
        return "cpu"
    if stand_ins and str(device) == "auto":
        return "cpu"
    from diffcore.experiments._stack import resolve_device

    return str(resolve_device(device))


def study_threads(study: Study, config: Any, device: str) -> int:
    """Torch threads of a run, by one rule: on the CPU the config's ``torch_threads`` field (or the
    study's declared default where the config has none); on a GPU torch's default (0)."""
    if device != "cpu":
        return 0
    return int(getattr(config, "torch_threads", study.threads))


def _study_participation(study: Study) -> Participation:
    """This process's part: from --shard / torchrun for a study that spreads; a study that does
    not refuses to run under either."""
    if study.spreads:
        return participation()
    if os.environ.get(SHARD_VAR, "").strip() or _launcher_count("WORLD_SIZE", "1") > 1:
        raise ConfigError(
            f"--shard / torchrun: {study.name} runs in one process (only a study "
            "that declares spreads=True spreads its units over processes)"
        )
    return Participation()


def run_study(
    study: Study,
    config: Any,
    out,
    make: Callable[[Any, str, Participation], Any],
    *,
    hooks: Any = None,
    device: str = "auto",
) -> dict:
    """The one body of every study's ``run``: check the config (its type and ``validate()``), refuse
    hooks a study does not take, resolve the device (:func:`study_device`) and the threads
    (:func:`study_threads`), build the study with ``make(hooks, device, participation)`` (it binds
    ``out``; ``hooks`` None means the study's default hooks), hold its folder's claim for a run of
    kind ``study.name`` while ``study.run()`` makes the results, and write ``timings.json``
    (:func:`write_timings`). Returns the results (``{}`` from a process of a sharded run that does
    not aggregate)."""
    if not isinstance(config, study.config_class):
        raise ConfigError(f"config: expected a {study.config_class.__name__}, got {type(config).__name__}")
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    if hooks is not None and not study.takes_hooks:
        raise ValueError(f"hooks: the {study.name} study has no replaceable hooks; pass None")
    device = study_device(study, device, stand_ins=hooks is not None)
    part = _study_participation(study)
    start, cpu = time.perf_counter(), time.process_time()
    with _env.torch_threads(study_threads(study, config, device)):
        made = make(hooks, device, part)
        with (
            made.ws.claim(study.name, shared=not part.alone),
            units_in_one_process() if study.one_process else contextlib.nullcontext(),
        ):
            results = made.run()
            if not results:  # a shard, or a rank other than 0: the aggregating run writes the results
                return results
            write_timings(made, study.name, device, time.perf_counter() - start, time.process_time() - cpu)
    log.info("%s study done in %.1f s: %s", study.name, time.perf_counter() - start, out)
    return results


TIMINGS_SCHEMA = "diffcore-timings/1"


def unit_timings(units: Iterable[Unit]) -> dict[str, dict]:
    """Seconds per unit kind, summed over the run's units (each unit's own wall time when it was
    made; a model trained in a stacked ensemble adds its share of the ensemble's seconds):
    ``{kind: {"seconds", "units", "reused"}}``."""
    out: dict[str, dict] = {}
    for unit in units:
        entry = out.setdefault(unit.path.parent.name, {"seconds": 0.0, "units": 0, "reused": 0})
        share = unit.meta.get("ensemble_train_seconds", 0.0) / unit.meta.get("ensemble_size", 1)
        entry["seconds"] += unit.seconds + share
        entry["units"] += 1
        entry["reused"] += int(unit.reused)
    return out


def write_timings(made: Any, name: str, device: str, wall: float, cpu: float) -> Path:
    """``timings.json`` of a run, one schema for every study (not part of the results)::

        {"schema": "diffcore-timings/1", "study": name, "device": "cpu", "torch_threads": 1,
         "wall_seconds": ..., "cpu_seconds": ..., "units": {kind: {"seconds", "units", "reused"}},
         "details": {...}}

    ``units``: :func:`unit_timings` of the units the run made or reused (:attr:`Workspace.units`);
    ``details``: what the study adds (its ``timing_details()``, when it has one)."""
    import torch

    details = getattr(made, "timing_details", None)
    return atomic_write_json(
        made.ws.root / "timings.json",
        {
            "schema": TIMINGS_SCHEMA,
            "study": name,
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "units": unit_timings(made.ws.units),
            "details": details() if details is not None else {},
        },
    )


@contextlib.contextmanager
def units_in_one_process() -> Iterator[None]:
    """Inside: torchrun's WORLD_SIZE and RANK hidden, so that a unit (a model's training) runs in
    this process alone instead of joining the ranks' process group (each rank makes its own units)."""
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ----------------------------------------------------------------------------- resumable units


def _read_record(path: Path, what: str, remedy: str) -> Any:
    """A JSON record of the run folder (config, manifest): a regular file of bounded size, not a
    link; UnitError naming it otherwise."""
    try:
        return load_json(path, what=what, follow=False)
    except FileReadError as error:
        raise UnitError(f"{error}; {remedy}") from None


def _is_unit_manifest(manifest: Any) -> bool:
    return (
        isinstance(manifest, dict)
        and isinstance(manifest.get("spec"), dict)
        and isinstance(manifest.get("files"), dict)
    )


def _earlier_study_run(root: Path) -> bool:
    """Whether ``root`` (no run record) is a study run of an earlier diffcore version: it holds a
    finished unit (``units/<kind>/<name>/MANIFEST.json`` in the unit format). A ``config.json``
    alone proves nothing (a model folder of another tool has one)."""
    units = root / "units"
    if units.is_symlink() or not units.is_dir():
        return False
    return any(_folder.holds_manifest(kind, _is_unit_manifest) for kind in sorted(units.iterdir()))


class UnitError(RuntimeError):
    """A finished unit that is corrupt, or defined differently than the current run asks."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """A finished unit: its folder, its spec and the metadata its producer returned."""

    path: Path
    spec: dict
    meta: dict
    seconds: float
    reused: bool

    def file(self, name: str) -> Path:
        return self.path / name


class Workspace:
    """An experiment's output folder with resumable units."""

    def __init__(self, root: str | os.PathLike, verify: bool = True, read_only: bool = False):
        """``read_only``: a folder only read from (another run's units, ``models_from``): it must
        exist, and is neither created nor required to be writable."""
        if read_only and not Path(root).is_dir():
            raise ConfigError(f"{root}: not a folder")
        self.root = Path(root) if read_only else _folder.check_output_folder(root)
        self.verify = verify
        self.kind: str | None = None
        self.units: list[Unit] = []  # the units this run made or reused, each once (for timings.json)

    @contextlib.contextmanager
    def claim(self, kind: str, shared: bool = False) -> Iterator[Workspace]:
        """Hold the folder for a run of ``kind`` (lock, stale temporaries removed, another kind
        refused; see :mod:`diffcore._folder`; ``shared``: one process of a sharded or distributed
        run). :meth:`bind_config` then records the kind."""
        with _folder.claim_folder(self.root, kind, record=False, adopt=_earlier_study_run, shared=shared):
            self.kind = kind
            try:
                yield self
            finally:
                self.kind = None

    # config ------------------------------------------------------------------
    def bind_config(self, config: Any, name: str = "config.json") -> None:
        """Write the run's config, or check that it equals the one already there (validate the
        config first); inside :meth:`claim` this also records the folder's kind. The check and
        the write happen under an exclusive lock (``.lock.config``), so two shards started with
        different configs never both bind."""
        path = self.root / name
        wanted = json.loads(json_dumps(config))
        with _folder.unit_claim(self.root / ".lock.config"):
            bound = os.path.lexists(path)
            if bound:
                found = _read_record(
                    path, "config", "delete it only if the folder holds nothing you need, or use a new --out folder"
                )
                if isinstance(found, dict):
                    found = upgrade_stored_config(self.kind, found, wanted)
                if found != wanted:
                    keys = set(found) | set(wanted) if isinstance(found, dict) else set(wanted)
                    diff = sorted(k for k in keys if not isinstance(found, dict) or found.get(k) != wanted.get(k))
                    raise UnitError(
                        f"out: {self.root} holds a run with another config (differs in "
                        f"{', '.join(diff)}); use a new --out folder or the same settings"
                    )
            # The kind before the config: another process of the same sharded or distributed run
            # checks the folder (_folder.check_kind) without this lock, and a config.json with no
            # kind record beside it would make it refuse the folder as one diffcore did not write.
            if self.kind is not None:
                _folder.record_kind(self.root, self.kind)
            if not bound:
                atomic_write_json(path, wanted)

    # paths -------------------------------------------------------------------
    # Every path below is checked to hold no symbolic link under the root: writing or deleting
    # through one could reach a user's files outside the run folder.
    def unit_path(self, kind: str, name: str) -> Path:
        return _folder.check_inside(self.root, self.root / "units" / kind / name)

    def claim_path(self, kind: str, name: str) -> Path:
        """The claim file of a unit (held while the unit is produced)."""
        return _folder.check_inside(self.root, self.root / "units" / kind / f".{name}.claim")

    def work_path(self, kind: str, name: str) -> Path:
        """Persistent scratch of an unfinished unit (kept across kills; removed when it finishes)."""
        path = _folder.check_inside(self.root, self.root / "work" / kind / name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # units -------------------------------------------------------------------
    def finished(self, kind: str, name: str, spec: Mapping[str, Any]) -> Unit | None:
        """The finished unit, or None. Raises UnitError if it is corrupt or has another spec (or
        its manifest names a file outside the unit, a link, or anything but a regular file)."""
        path = self.unit_path(kind, name)
        manifest_path = path / MANIFEST
        if not os.path.lexists(manifest_path):
            return None
        manifest = _read_record(manifest_path, "unit manifest", f"delete {path} to redo the unit")
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise UnitError(f"{manifest_path}: not a unit manifest; delete {path} to redo the unit")
        wanted = json.loads(json_dumps(spec))
        if replaced_files(manifest.get("spec"), wanted):
            log.info("unit %s/%s was made from files that have been replaced since: making it again", kind, name)
            return None  # _produce replaces it, under the unit's claim
        if manifest.get("spec") != wanted:
            raise UnitError(
                f"unit {kind}/{name} in {self.root} was made with spec {manifest.get('spec')}, "
                f"this run asks for {wanted}; use a new --out folder"
            )
        for rel, entry in files.items():
            file = self._unit_file(path, rel, f"unit {kind}/{name}")
            if not file.is_file() or file.stat().st_size != entry["size"]:
                raise UnitError(
                    f"unit {kind}/{name}: file {rel} is missing or has the wrong size; delete {path} to redo it"
                )
            if self.verify and sha256_file(file) != entry["sha256"]:
                raise UnitError(f"unit {kind}/{name}: file {rel} does not match its checksum; delete {path} to redo it")
        return Unit(path, manifest["spec"], manifest.get("meta", {}), manifest.get("seconds", 0.0), True)

    @staticmethod
    def _unit_file(unit: Path, rel: Any, what: str) -> Path:
        """The file ``rel`` a unit's manifest lists: a relative path inside the unit folder, no
        link on the way, a regular file (never a FIFO or device, which would hang the checksum)."""
        parts = Path(rel).parts if isinstance(rel, str) else ()
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise UnitError(f"{what}: its manifest lists {rel!r}, a path outside the unit; delete {unit} to redo it")
        try:
            file = _folder.check_inside(unit, unit / rel)
        except _folder.FolderError as error:
            raise UnitError(f"{what}: {error}; delete {unit} to redo it") from None
        if os.path.lexists(file) and not file.is_file():
            raise UnitError(f"{what}: {rel} is not a regular file; delete {unit} to redo it")
        return file

    def run_unit(
        self, kind: str, name: str, spec: Mapping[str, Any], produce: Callable[[Path, Path], Mapping[str, Any] | None]
    ) -> Unit:
        """Reuse the finished unit ``kind/name`` or produce it.

        ``produce(tmp_dir, work_dir)`` writes the unit's files into ``tmp_dir`` (a fresh folder)
        and may keep resumable state in ``work_dir``; it returns JSON metadata (or None). The
        folder becomes the unit only after its manifest is written, by one rename.
        """
        return self._run_unit(kind, name, spec, produce, wait=True)

    def try_run_unit(
        self, kind: str, name: str, spec: Mapping[str, Any], produce: Callable[[Path, Path], Mapping[str, Any] | None]
    ) -> Unit | None:
        """:meth:`run_unit`, or None at once when another process is producing the unit."""
        return self._run_unit(kind, name, spec, produce, wait=False)

    def _run_unit(self, kind, name, spec, produce, wait: bool) -> Unit | None:
        unit = self._find_or_produce(kind, name, spec, produce, wait)
        if unit is not None:
            self.record(unit)
        return unit

    def record(self, unit: Unit) -> None:
        """Count ``unit`` in :attr:`units` once: a unit made in this process and found finished again
        later keeps its first, producing record."""
        if not any(u.path == unit.path for u in self.units):
            self.units.append(unit)

    def _find_or_produce(self, kind, name, spec, produce, wait: bool) -> Unit | None:
        unit = self.finished(kind, name, spec)
        if unit is not None:
            log.debug("reusing %s/%s", kind, name)
            return unit
        with _folder.unit_claim(self.claim_path(kind, name), wait) as held:  # one producer at a time
            if not held:
                return None
            unit = self.finished(kind, name, spec)  # made by another process meanwhile
            return unit if unit is not None else self._produce(kind, name, spec, produce)

    def _produce(
        self, kind: str, name: str, spec: Mapping[str, Any], produce: Callable[[Path, Path], Mapping[str, Any] | None]
    ) -> Unit:
        final = self.unit_path(kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(final):  # a folder without a manifest: leftovers, never a finished unit
            _folder.remove_tree(self.root, final)
        tmp = temporary_folder(final)
        try:
            start = time.perf_counter()
            meta = dict(produce(tmp, self.work_path(kind, name)) or {})
            seconds = time.perf_counter() - start
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = file.relative_to(tmp).as_posix()
                files[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
            atomic_write_json(tmp / MANIFEST, {"spec": spec, "meta": meta, "files": files, "seconds": seconds})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:  # the unit is finished: its scratch is no longer needed (never removed through a link)
            _folder.remove_tree(self.root, self.root / "work" / kind / name)
        except OSError as error:
            log.warning("could not remove the scratch of %s/%s: %s", kind, name, error)
        log.info("finished %s/%s in %.1f s", kind, name, seconds)
        return Unit(final, json.loads(json_dumps(spec)), json.loads(json_dumps(meta)), seconds, False)
