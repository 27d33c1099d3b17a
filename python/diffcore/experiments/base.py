"""The experiment framework: configs with presets, atomic writes, and resumable units.

An experiment writes everything under one output folder::

    OUT/config.json            the resolved config (a rerun with a different config is refused)
    OUT/units/<kind>/<name>/   finished units: a trained model, a sample set, a metric ...
    OUT/work/<kind>/<name>/    scratch of unfinished units (e.g. a trainer's checkpoints)
    OUT/results.json, *.csv, *.png

A unit is *finished* when its folder holds ``MANIFEST.json`` listing every file with its size and
SHA-256 and the unit's ``spec`` (the parameters that define it). A unit is produced in a temporary
folder and moved into place with one ``os.replace`` after its manifest is written, so a killed run
leaves either a finished unit or none; a finished unit whose files no longer match the manifest is
an error, never silently reused. Single files (results, figures) are written to a temporary file in
the same folder and ``os.replace``-d over the target.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from diffcore._atomic import atomic_write_bytes  # noqa: F401  (re-exported: the studies' atomic writes)

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


def json_dumps(value: Any) -> str:
    return json.dumps(to_jsonable(value), indent=2, sort_keys=True, allow_nan=True) + "\n"


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_bytes(path, json_dumps(value).encode())


def atomic_write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                     columns: list[str] | None = None) -> Path:
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


def apply_overrides(config: Any, overrides: Iterable[str]) -> Any:
    """A copy of the dataclass ``config`` with ``key=value`` overrides (``--set`` on the CLI)."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in names:
            raise ConfigError(f"--set {key}: unknown key; known keys: {', '.join(sorted(names))}")
        changes[key] = parse_value(text, hints[key], key)
    return dataclasses.replace(config, **changes)


def config_from_preset(presets: Mapping[str, Callable[[], Any]], preset: str,
                       overrides: Iterable[str] = ()) -> Any:
    if preset not in presets:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return apply_overrides(presets[preset](), overrides)


# ----------------------------------------------------------------------------- resumable units

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

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = Path(root)
        self.verify = verify
        self.root.mkdir(parents=True, exist_ok=True)

    # config ------------------------------------------------------------------
    def bind_config(self, config: Any, name: str = "config.json") -> None:
        """Write the run's config, or check that it equals the one already there."""
        path = self.root / name
        wanted = json.loads(json_dumps(config))
        if path.exists():
            found = json.loads(path.read_text())
            if found != wanted:
                diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                raise UnitError(f"out: {self.root} holds a run with another config (differs in "
                                f"{', '.join(diff)}); use a new --out folder or the same settings")
            return
        atomic_write_json(path, wanted)

    # paths -------------------------------------------------------------------
    def unit_path(self, kind: str, name: str) -> Path:
        return self.root / "units" / kind / name

    def work_path(self, kind: str, name: str) -> Path:
        """Persistent scratch of an unfinished unit (kept across kills; removed when it finishes)."""
        path = self.root / "work" / kind / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # units -------------------------------------------------------------------
    def finished(self, kind: str, name: str, spec: Mapping[str, Any]) -> Unit | None:
        """The finished unit, or None. Raises UnitError if it is corrupt or has another spec."""
        path = self.unit_path(kind, name)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise UnitError(f"unit {kind}/{name}: unreadable {MANIFEST}; delete {path} to redo it") from exc
        wanted = json.loads(json_dumps(spec))
        if manifest.get("spec") != wanted:
            raise UnitError(f"unit {kind}/{name} in {self.root} was made with spec {manifest.get('spec')}, "
                            f"this run asks for {wanted}; use a new --out folder")
        for rel, entry in manifest["files"].items():
            file = path / rel
            if not file.is_file() or file.stat().st_size != entry["size"]:
                raise UnitError(f"unit {kind}/{name}: file {rel} is missing or has the wrong size; "
                                f"delete {path} to redo it")
            if self.verify and sha256_file(file) != entry["sha256"]:
                raise UnitError(f"unit {kind}/{name}: file {rel} does not match its checksum; "
                                f"delete {path} to redo it")
        return Unit(path, manifest["spec"], manifest.get("meta", {}), manifest.get("seconds", 0.0), True)

    def run_unit(self, kind: str, name: str, spec: Mapping[str, Any],
                 produce: Callable[[Path, Path], Mapping[str, Any] | None]) -> Unit:
        """Reuse the finished unit ``kind/name`` or produce it.

        ``produce(tmp_dir, work_dir)`` writes the unit's files into ``tmp_dir`` (a fresh folder)
        and may keep resumable state in ``work_dir``; it returns JSON metadata (or None). The
        folder becomes the unit only after its manifest is written, by one rename.
        """
        unit = self.finished(kind, name, spec)
        if unit is not None:
            log.debug("reusing %s/%s", kind, name)
            return unit
        final = self.unit_path(kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a folder without a manifest: leftovers, never a finished unit
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
        try:
            start = time.perf_counter()
            meta = dict(produce(tmp, self.work_path(kind, name)) or {})
            seconds = time.perf_counter() - start
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = file.relative_to(tmp).as_posix()
                files[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
            atomic_write_json(tmp / MANIFEST, {"spec": spec, "meta": meta, "files": files,
                                               "seconds": seconds})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.root / "work" / kind / name, ignore_errors=True)
        log.info("finished %s/%s in %.1f s", kind, name, seconds)
        return Unit(final, json.loads(json_dumps(spec)), json.loads(json_dumps(meta)), seconds, False)
