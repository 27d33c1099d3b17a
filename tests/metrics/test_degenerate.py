"""Degenerate inputs to the similarity measures (issue 32): a descriptor whose rows are not finite
or all zero, or whose output is not one tensor [B, F], is refused naming the file; constant images
under the pixel cosine follow one convention in the GL (k-NN) and the RP (pairwise) path; means of
similarities are exact, whatever the thread count."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore import metrics
from diffcore.metrics import exact_mean, get_similarity, gl_score, rp_score


class Scaled(torch.nn.Module):
    """Descriptor ``scale * mean over pixels`` of each channel, repeated to 4 features."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean(dim=(2, 3)) * self.scale).repeat(1, 4)


class Tupled(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1), x.flatten(1)


class Flat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten()


class OneRow(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:1]


def _descriptor(tmp_path, module: torch.nn.Module, name: str) -> str:
    path = tmp_path / f"{name}.torchscript.pt"
    torch.jit.script(module).save(str(path))
    return f"raw:{path}"


def images(n=4, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("scale,word", [(0.0, "all zeros"), (float("nan"), "NaN")])
def test_descriptor_rows_without_direction_are_refused_in_gl_and_rp(tmp_path, scale, word):
    spec = _descriptor(tmp_path, Scaled(scale), "degenerate")
    sim = get_similarity(spec)
    x = images()
    with pytest.raises(ValueError, match=f"degenerate.torchscript.pt.*{word}"):
        gl_score(x, images(seed=1), sim, 0.6)
    with pytest.raises(ValueError, match=f"degenerate.torchscript.pt.*{word}"):
        rp_score(x, x, sim, 0.6)


@pytest.mark.parametrize(
    "module,word",
    [
        (Tupled(), "returned a tuple"),
        (Flat(), r"returned shape \(256,\)"),
        (OneRow(), r"returned shape \(1, 64\) for 4 images"),
    ],
)
def test_descriptor_output_that_is_not_one_b_by_f_tensor_is_refused(tmp_path, module, word):
    sim = get_similarity(_descriptor(tmp_path, module, "odd"))
    with pytest.raises(ValueError, match=f"odd.torchscript.pt.*{word}"):
        sim.embed(images())


def test_non_finite_images_are_refused_by_pixel_measures():
    x = images()
    x[2, 0, 3, 3] = float("nan")
    for name in ("cosine", "l2"):
        with pytest.raises(ValueError, match=f"'{name}'.*row 2 .*NaN"):
            get_similarity(name).embed(x)


def test_constant_images_have_one_convention_in_gl_and_rp():
    sim = get_similarity("cosine")
    train = images(6, seed=3)
    blank = torch.full((2, 1, 8, 8), -1.0)
    samples = torch.cat([blank, images(2, seed=4)])
    gl = gl_score(samples, train, sim, 0.6, knn=metrics.similarity.default_knn())
    # a blank sample is orthogonal to every varying training image: similarity 0, not 0.5
    assert gl.nn_similarity[:2].abs().max() < 1e-6
    assert gl.generalized[:2].all()
    pair = rp_score(blank, torch.full((2, 1, 8, 8), 0.5), sim, 0.6)  # constant vs constant: 1
    assert torch.allclose(pair.similarity, torch.ones(2))
    mixed = rp_score(blank, images(2, seed=5), sim, 0.6)  # constant vs varying: 0
    assert mixed.similarity.abs().max() < 1e-6
    # the k-NN path gives what the pairwise path gives, for a blank training image too
    train_with_blank = torch.cat([train, blank[:1]])
    gl_blank = gl_score(blank, train_with_blank, sim, 0.6, knn=metrics.similarity.default_knn())
    assert torch.allclose(gl_blank.nn_similarity, torch.ones(2), atol=1e-6)
    assert not gl_blank.generalized.any()


def test_exact_mean_does_not_depend_on_order_or_threads():
    values = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 1e3
    want = math.fsum(values.double().tolist()) / values.numel()
    assert exact_mean(values) == want
    assert exact_mean(values.flip(0)) == want
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert exact_mean(values) == want
    finally:
        torch.set_num_threads(before)
    assert math.isnan(exact_mean(torch.zeros(0)))


def test_embeddings_do_not_depend_on_how_rows_are_chunked(monkeypatch):
    from diffcore.metrics import similarity

    x = torch.cat([images(9, seed=6), torch.zeros(1, 1, 8, 8)])
    whole = get_similarity("cosine").embed(x)
    monkeypatch.setattr(similarity, "ROW_CHUNK", 3)
    assert torch.equal(get_similarity("cosine").embed(x), whole)
    assert torch.equal(whole[-1, -1], torch.tensor(1.0))  # the constant image's own coordinate
