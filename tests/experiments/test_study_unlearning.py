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


def test_attack_retrained_through_the_defense_cannot_use_the_defended_span():
    c = study.PRESETS["tiny"]()
    vocab = ul.Vocabulary.digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = study.PromptModel(c, len(vocab), generator=torch.Generator().manual_seed(0)).freeze()
        for p in model.net.parameters():  # the zero-initialised output layers would hide the conditioning
            p.add_(0.1 * torch.randn(p.shape))
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    attrs = ul.attribute_token_ids(vocab, ul.attribute_bins(ul.image_attributes(images))[0])
    span = torch.randn(2, c.embed_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    basis = ul.orthonormal_basis(span)
    v = torch.randn(c.embed_dim, generator=torch.Generator().manual_seed(4))

    def loss(vector, defense):
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            return float(study._attack_loss(model, vector, images, attrs, vocab, c, g, defense))

    shifted = v + (3.0 * span[0] - span[1]).float()  # the same attack plus a component inside the span
    assert abs(loss(v, basis) - loss(shifted, basis)) < 1e-5
    assert abs(loss(v, None) - loss(shifted, None)) > 1e-4  # undefended, the span component matters


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
    with pytest.raises(ConfigError, match="^other_classes: one class per other concept"):
        dataclasses.replace(paper, other_concepts=("dog",)).validate()
    with pytest.raises(ConfigError, match=r"^templates: each template holds \{x\} once"):
        dataclasses.replace(paper, templates=("a photo",)).validate()
    no_pipeline = dataclasses.replace(
        paper, pipeline_dir=str(tmp_path), classifier_path=str(tmp_path), concept="nudity"
    )
    with pytest.raises(ConfigError, match="^pipeline_dir: .* has no tokenizer/ folder"):
        study.run(no_pipeline, tmp_path / "out2", progress=False)


def _tiny_pipeline(root):
    """A randomly initialised text-to-image pipeline from configurations only (nothing downloaded):
    a character-level CLIP tokenizer (vocab/merges written here), CLIPTextModel, UNet2DConditionModel,
    AutoencoderKL, DDPM scheduler, saved with save_pretrained; and an exported 3-class classifier."""
    import string

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    pipe = root / "pipe"
    (pipe / "tokenizer").mkdir(parents=True)
    letters = list(string.ascii_lowercase)
    words = ["<|startoftext|>", "<|endoftext|>", *letters, *(t + "</w>" for t in letters)]
    (pipe / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(words)}))
    (pipe / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(pipe / "tokenizer" / "vocab.json"), str(pipe / "tokenizer" / "merges.txt"), model_max_length=24
    )
    tokenizer.save_pretrained(pipe / "tokenizer")
    text = CLIPTextConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=24,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(text).save_pretrained(pipe / "text_encoder")
    UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).save_pretrained(pipe / "unet")
    AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).save_pretrained(pipe / "vae")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(pipe / "scheduler")
    classifier = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    program = torch.export.export(
        classifier.eval(), (torch.zeros(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("n")},)
    )
    torch.export.save(program, root / "classifier.pt2")
    return pipe, root / "classifier.pt2"


def test_paper_preset_end_to_end_on_a_tiny_random_pipeline(tmp_path, monkeypatch):
    """The paper preset's whole path (ESD on the UNet, SubAttack over the CLIP token-embedding table,
    the subspace attack, the projection defense, the claims) on a tiny random pipeline. Its numbers
    mean nothing (random weights, a random classifier): this checks the machinery, not the paper."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when the hub is first imported; every load is local anyway
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from diffcore.experiments import _unlearning_diffusers as paper_backend

    pipe_dir, classifier = _tiny_pipeline(tmp_path)
    config = dataclasses.replace(
        study.PRESETS["paper"](),
        pipeline_dir=str(pipe_dir),
        classifier_path=str(classifier),
        concept="cat",
        concept_class=1,
        other_concepts=("dog",),
        other_classes=(2,),
        resolution=8,
        concept_images=4,
        batch_size=2,
        unlearn_steps=2,
        attack_steps=2,
        attack_hidden=8,
        templates=("{x}", "a {x}"),
        samples_per_prompt=2,
        sampler_steps=2,
        grid_samples=2,
    )
    first = study.run(config, tmp_path / "out", device="cpu", progress=False)
    assert first["backend"] == "diffusers" and first["claims"]["attack_embeddings_orthogonal"]["holds"]
    assert (tmp_path / "out" / "unlearning-success.png").exists()
    assert all(isinstance(v["holds"], bool) for v in first["claims"].values())
    expected = {"unlearning_lowers_concept", "sub3_transfers_to_B", "defense_keeps_other_concepts"}
    assert expected | {"retrained_sub1_recovers_after_defense"} <= set(first["claims"])
    names = {s["name"] for s in paper_backend.sample_sets(config)}
    assert set(first["attack_success"]) == names and all(v["n"] == 2 for v in first["attack_success"].values())
    vocab_size = 2 + 2 * 26
    assert len(first["top_tokens"]) == 3 and all(0 < t["nonzero"] <= vocab_size for t in first["top_tokens"])
    units = tmp_path / "out"
    attack = torch.load(next(units.glob("**/attack/subspace/state.pt")), weights_only=False)
    assert attack["alphas"].shape == (3, vocab_size) and bool((attack["alphas"] >= 0).all())
    assert ul.max_abs_cosine(attack["vectors"]) < 1e-6
    esd = torch.load(next(units.glob("**/unlearned-0/state.pt")), weights_only=False)["unet"]
    pipeline = paper_backend.Pipeline(str(pipe_dir))
    original = pipeline.unet.state_dict()
    assert any(not torch.equal(esd[k], original[k]) for k in original)  # ESD changed the UNet
    # the defense acts on the token embeddings: an attack vector in the span conditions like a zero one
    ids, slot = pipeline.prompt_ids("a {x}", None)
    basis = ul.orthonormal_basis(attack["vectors"])
    with torch.no_grad():
        attacked = pipeline.encode(ids, slot, attack["vectors"][0].float(), basis)
        emptied = pipeline.encode(ids, slot, torch.zeros(16), basis)
        undefended = pipeline.encode(ids, slot, attack["vectors"][0].float())
    assert torch.allclose(attacked, emptied, atol=1e-5) and not torch.allclose(attacked, undefended, atol=1e-3)
    with torch.no_grad():  # sample i depends on seed i only, whatever the batch
        null = pipeline.encode(pipeline.prompt_ids("{x}", "")[0])
        batch = paper_backend.sample(pipeline, pipeline.unet, attacked, null, [5, 6, 7], config)
        monkeypatch.setattr(paper_backend, "SAMPLE_CHUNK", 2)
        chunked = paper_backend.sample(pipeline, pipeline.unet, attacked, null, [5, 6, 7], config)
        alone = paper_backend.sample(pipeline, pipeline.unet, attacked, null, [6], config)
    assert batch.shape == (3, 3, 8, 8) and torch.allclose(batch, chunked, atol=1e-5)
    assert torch.allclose(batch[1:2], alone, atol=1e-5)
    second = study.run(config, tmp_path / "out", device="cpu", progress=False)
    assert second == first
    timings = json.loads((units / "timings.json").read_text())["units"]
    assert all(entry["reused"] == entry["units"] for entry in timings.values())


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
    assert {f"retrained_sub{k}_recovers_after_defense" for k in (1, 2, 3)} <= set(first["claims"])
    assert len(first["retrained_top_tokens"]) == config.attack_k
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
