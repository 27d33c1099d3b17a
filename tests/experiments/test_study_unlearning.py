"""The unlearning study (docs/studies.md, unlearning): SubAttack's non-negative coefficients, the
orthogonal subspace attack, the projection defense, ESD's negative-guidance optimum, bad configs,
and the tiny preset end to end (rerun reuses every unit)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffcore.analysis import unlearning as ul
from diffcore.experiments import EXPERIMENTS, experiment, unlearning as study
from diffcore.experiments.base import ConfigError


def test_registered():
    assert EXPERIMENTS["unlearning"] == "diffcore.experiments.unlearning" and experiment("unlearning") is study


def test_alpha_is_never_negative_even_when_training_pushes_it_down():
    g = torch.Generator().manual_seed(0)
    coef = ul.CoefficientNet(8, 16, init_alpha=0.2, generator=g)
    vocab = torch.randn(45, 8, generator=g)
    opt = torch.optim.SGD(coef.parameters(), lr=1.0)
    seen_zero = False
    for _ in range(30):  # the loss rewards negative alphas: ReLU must clip them at 0
        alpha = coef(vocab)
        assert alpha.shape == (45,) and bool((alpha >= 0).all())
        seen_zero |= bool((alpha == 0).any())
        opt.zero_grad()
        alpha.sum().backward()
        opt.step()
    assert seen_zero
    wild = ul.CoefficientNet(8, 16, init_alpha=-5.0)
    assert bool((wild(torch.randn(100, 8, generator=g) * 10) >= 0).all())


def test_subspace_attack_embeddings_are_orthogonal_and_non_negative_combinations():
    c = dataclasses.replace(study.PRESETS["tiny"](), attack_k=4, attack_steps=4)
    vocab = ul.Vocabulary.digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = study.PromptModel(c, len(vocab), generator=torch.Generator().manual_seed(0)).freeze()
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    attrs = ul.attribute_token_ids(vocab, ul.attribute_bins(ul.image_attributes(images))[0])
    out = study.subspace_attack(c, vocab, model, images, attrs, seed=0)
    v = out["vectors"]
    assert v.shape == (4, c.embed_dim) and bool((out["alphas"] >= 0).all())
    assert ul.max_abs_cosine(v) < 1e-6
    assert bool((v.norm(dim=1) > 1e-3).all())  # not orthogonal by being zero
    q = ul.orthonormal_basis(v)
    assert torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_projection_removes_the_span_and_leaves_its_complement():
    g = torch.Generator().manual_seed(1)
    attacks = torch.randn(3, 10, generator=g, dtype=torch.float64)
    q = ul.orthonormal_basis(attacks)
    inside = torch.randn(5, 3, generator=g, dtype=torch.float64) @ attacks
    outside = ul.project_out(torch.randn(5, 10, generator=g, dtype=torch.float64), q)
    assert float(ul.project_out(inside, q).abs().max()) < 1e-12
    assert torch.allclose(ul.project_out(outside, q), outside, atol=1e-12)
    assert float((outside @ attacks.T).abs().max()) < 1e-10
    mixed = inside + outside  # the complement part survives, the span part goes
    assert torch.allclose(ul.project_out(mixed, q), outside, atol=1e-10)
    assert ul.project_out(mixed.float(), q).dtype == torch.float32


def test_esd_loss_optimum_is_the_negative_guidance_target():
    """Closed-form stand-in: teachers D(x, c) = A_c x + b_c, D(x, null) = A_0 x + b_0; a linear
    student trained by esd_loss converges to A_0 - eta (A_c - A_0), b_0 - eta (b_c - b_0)."""
    g = torch.Generator().manual_seed(2)
    d, eta = 6, 1.5
    a_c, a_0 = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    b_c, b_0 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(200, d, generator=g, dtype=torch.float64)
    weight = torch.rand(200, generator=g, dtype=torch.float64) + 0.5
    w = torch.zeros(d, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = ul.esd_loss(x @ w.T + b, x @ a_c.T + b_c, x @ a_0.T + b_0, eta, weight)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(w.detach(), a_0 - eta * (a_c - a_0), atol=1e-6)
    assert torch.allclose(b.detach(), b_0 - eta * (b_c - b_0), atol=1e-6)
    assert torch.equal(ul.esd_target(torch.ones(2), torch.zeros(2), 1.0), -torch.ones(2))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("attack_k", 9, "attack_k: at most embed_dim = 8"),
        ("templates", ("{x} sparkly",), "templates: unknown token 'sparkly'"),
        ("templates", ("a image",), r"templates: each template holds \{x\} once"),
        ("erased_digit", 10, "erased_digit"),
        ("erased_digit", -1, "erased_digit"),
        ("erased_form", "hex", "erased_form"),
        ("unlearn_seeds", (4, 4), "unlearn_seeds: expected distinct values"),
        ("grid_samples", 99, "grid_samples"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    config = dataclasses.replace(study.PRESETS["tiny"](), **{field: value})
    with pytest.raises(ConfigError, match=f"^{message}"):
        config.validate()


def test_unknown_token_and_paper_paths(tmp_path):
    with pytest.raises(ValueError, match="token: 'sparkly' is not in the vocabulary"):
        ul.Vocabulary.digits().id("sparkly")
    paper = study.PRESETS["paper"]()
    paper.validate()  # the preset itself is valid; its local files are checked when a run starts
    with pytest.raises(ConfigError, match="^pipeline_dir: the diffusers backend needs an existing local path"):
        study.run(paper, tmp_path / "out", progress=False)
    ready = dataclasses.replace(
        paper,
        pipeline_dir=str(tmp_path),
        unlearned_unet_dir=str(tmp_path),
        classifier_path=str(tmp_path),
        concept="nudity",
    )
    with pytest.raises(ConfigError, match="^backend: the diffusers backend .* not implemented"):
        study.run(ready, tmp_path / "out2", progress=False)


def test_vocabulary_and_attributes():
    vocab = ul.Vocabulary.digits()
    assert len(vocab) == 45 and vocab.name_id(3, "roman") == vocab.id("III")
    assert vocab.digit_of()[vocab.id("three")] == 3 and vocab.digit_of()[vocab.id("bold")] is None
    img = -torch.ones(2, 1, 8, 8)
    img[0, 0, :, 3] = 1.0  # a vertical bar: no slant
    img[1, 0, range(8), range(7, -1, -1)] = 1.0  # bottom-left to top-right: slants right
    raw = ul.image_attributes(img)
    assert abs(float(raw[0, 2])) < 1e-9 and float(raw[1, 2]) > 0.9


def test_tiny_preset_end_to_end_and_rerun_reuses_every_unit(tmp_path):
    config = study.PRESETS["tiny"]()
    first = study.run(config, tmp_path / "out", device="cpu", progress=False)
    assert (tmp_path / "out" / "unlearning-success.png").exists()
    assert (tmp_path / "out" / "unlearning-samples.png").exists()
    assert set(first["claims"]) >= {"sub1_recovers_on_A", "defense_lowers_free", "defense_keeps_other_digits"}
    assert all(isinstance(v["holds"], bool) for v in first["claims"].values())
    assert first["claims"]["attack_embeddings_orthogonal"]["holds"]
    rate = first["attack_success"]["A-none-sub1_t0"]
    assert 0 <= rate["low"] <= rate["value"] <= rate["high"] <= 1 and rate["n"] == config.samples_per_prompt
    assert len(first["top_tokens"]) == config.attack_k
    second = study.run(config, tmp_path / "out", device="cpu", progress=False)
    assert second == first
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())["units"]
    assert set(timings) == {"model", "attack", "samples"}
    assert all(entry["reused"] == entry["units"] for entry in timings.values())
