"""Copy-detection descriptors: the kind states the preprocessing (SSCD as the paper feeds it), a file
without its kind is refused, and descriptor files never unpickle (malicious files made here)."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import torch
import torch.nn.functional as F

from diffcore.metrics import get_similarity
from diffcore.metrics.similarity import IMAGENET_MEAN, IMAGENET_STD, load_descriptor


class Recorder(torch.nn.Module):
    """Stand-in descriptor that keeps the last batch it received."""

    def __init__(self):
        super().__init__()
        self.seen = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return x.mean(dim=(2, 3))


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def recorder_file(tmp_path):
    path = tmp_path / "recorder.torchscript.pt"
    torch.jit.script(Recorder()).save(str(path))
    return path


def images(n=3, channels=1, size=8):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_sscd_kind_feeds_the_papers_preprocessing(recorder_file):
    sim = get_similarity(f"sscd:{recorder_file}")
    x = images()
    sim.embed(x)
    seen = sim.module().seen
    # independent: [0, 1], RGB, resize to 320x320, ImageNet mean/std (the paper's public code)
    x01 = ((x + 1) / 2).expand(-1, 3, -1, -1)
    want = F.interpolate(x01, size=(320, 320), mode="bilinear", align_corners=False)
    want = (want - torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    assert seen.shape == (3, 3, 320, 320)
    torch.testing.assert_close(seen, want, atol=2e-6, rtol=0)
    assert sim.describe()["preprocess"]["size"] == 320 and sim.name == "sscd:recorder.torchscript.pt"
    assert sim.default_threshold == 0.6


def test_raw_kind_feeds_images_as_they_are(recorder_file):
    sim = get_similarity(f"raw:{recorder_file}")
    x = images(channels=3, size=5)
    sim.embed(x)
    assert torch.equal(sim.module().seen, x)


@pytest.mark.parametrize("spec", ["{p}", "features:{p}", "imagenet:{p}", "sscd:"])
def test_descriptor_without_its_kind_is_refused(recorder_file, spec):
    with pytest.raises(ValueError, match=r"with its kind: 'sscd:PATH' \(resized to 320x320"):
        get_similarity(spec.format(p=recorder_file))


# ----------------------------------------------------------------------------- malicious files


def exported_archive(tmp_path) -> bytes:
    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return F.avg_pool2d(x, 2).flatten(1) * self.scale

    path = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(Pool(), (images(2),)), str(path))
    return path.read_bytes()


def rewrite_zip(data: bytes, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> bytes:
    """The archive with members whose name ends in a key of ``replace`` replaced, and ``add`` appended."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for name in src.namelist():
            body = next((v for k, v in replace.items() if name.endswith(k)), src.read(name))
            dst.writestr(name, body)
        for member, body in (add or {}).items():
            dst.writestr(f"{root}/{member}", body)
    return out.getvalue()


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def exported_dynamic_archive(tmp_path) -> bytes:
    """A plain torch.export archive whose batch size is a symbol (an ``expr_str`` in models/*.json)."""

    class Pool(torch.nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "dynamic.pt2"
    batch = torch.export.Dim("batch", min=2)
    torch.export.save(torch.export.export(Pool(), (images(3),), dynamic_shapes=({0: batch},)), str(path))
    return path.read_bytes()


def sympify_payload(data: bytes, marker) -> bytes:
    """The archive with every SymInt expression replaced by one that ``sympy.sympify`` would run."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        model_name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        text = archive.read(model_name).decode()
    symbol = "Symbol('s77', positive=True, integer=True)"
    assert symbol in text  # the exported shape expression the payload replaces
    payload = f"(sympify.__globals__['__builtins__']['__import__']('os').system('touch {marker}'), {symbol})[1]"
    return rewrite_zip(data, {model_name.split("/", 1)[1]: text.replace(symbol, payload).encode()})


@pytest.mark.parametrize("spec", ["raw:{p}", "sscd:{p}"])
def test_export_archive_with_code_in_a_shape_expression_runs_nothing(tmp_path, spec):
    marker = tmp_path / "ran"
    path = tmp_path / "evil_expr.pt2"
    path.write_bytes(sympify_payload(exported_dynamic_archive(tmp_path), marker))
    with pytest.raises(ValueError, match=r"refusing torch.export archive .*evil_expr.pt2.*TorchScript"):
        get_similarity(spec.format(p=path)).embed(images(2))
    with pytest.raises(ValueError, match="refusing torch.export archive"):
        load_descriptor(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_export_archive_is_refused(tmp_path):
    marker = tmp_path / "ran"
    data = exported_archive(tmp_path)
    cases = {
        "plain.pt2": data,
        "evil_inputs.pt2": rewrite_zip(data, {"data/sample_inputs/model.pt": pickled((Payload(marker), {}))}),
        "evil_custom.pt2": rewrite_zip(data, {}, add={"data/constants/custom_obj_0": pickled(Payload(marker))}),
        "evil_legacy.pt2": rewrite_zip(data, {}, add={"data/weights/model.pt": pickled(Payload(marker))}),
    }
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(ValueError, match="refusing torch.export archive"):
            load_descriptor(tmp_path / name)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_and_other_archives_are_refused(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02" + b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_descriptor(tmp_path / "legacy.pt")
    torch.save({"w": Payload(marker)}, tmp_path / "state.pt")  # torch.save zip: a pickle, not TorchScript
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_descriptor(tmp_path / "state.pt")
    assert not marker.exists()
