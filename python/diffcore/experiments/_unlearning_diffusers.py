"""The ``unlearning`` study's diffusers backend (the ``paper`` preset): a local text-to-image
pipeline folder (Stable Diffusion layout, ``save_pretrained``), nothing downloaded.

- Vocabulary: the text encoder's token-embedding table ``[V, E]`` (``get_input_embeddings``).
- Attack and defense act on the prompt's token embeddings (before the position embeddings), through
  a forward hook on the token-embedding module: ``<v_att>`` replaces the token at the prompt's slot,
  the defense projects every token embedding onto the orthogonal complement of the attack span.
- Images of the concept: ``concept_images`` samples of the original pipeline for ``concept`` (the
  attack and ESD train on these, as the paper's attacks train on the original model's images).
- ESD (Eq. 3) in epsilon form: ``eps'(x_t, c) -> eps(x_t, null) - eta (eps(x_t, c) - eps(x_t, null))``
  on ``x_t`` = the scheduler's ``add_noise`` of the concept latents at uniform timesteps; every UNet
  weight (``unlearn_params="unet"``, ESD-u) or the cross-attention layers only (``label_projection``,
  ESD-x). Model A is ``unlearned_unet_dir`` when given (e.g. a released ESD checkpoint), else ESD
  with ``unlearn_seeds[0]``; model B (transfer) is ESD with ``unlearn_seeds[1]``.
- SubAttack / subspace attack / free embedding (Eq. 5-6): the DDPM epsilon loss on the concept
  latents, the prompt a template with ``<v_att>`` in its slot.
- Sampling: DDIM (eta 0; built from the folder's scheduler configuration) with classifier-free
  guidance ``guidance_scale``; sample i starts from the noise of seed i only. A VAE is used when the
  folder has one (``vae/``), else the UNet works in pixel space.
- Classifier: a ``torch.export`` program (``.pt2``) or TorchScript module at ``classifier_path``:
  images ``[N, 3, H, W]`` in [-1, 1] -> logits ``[N, classes]``; attack success = the
  fraction predicted as ``concept_class``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from diffcore.analysis import unlearning as ul
from diffcore.experiments import unlearning
from diffcore.experiments.base import ConfigError, Workspace, atomic_write_json, json_dumps
from diffcore.metrics import intervals

SLOT = "{x}"


class Pipeline:
    """The local pipeline's parts: ``tokenizer``, ``text`` (CLIPTextModel), ``unet``
    (UNet2DConditionModel), ``vae`` (AutoencoderKL or None), ``scheduler`` (DDIM from the folder's
    scheduler configuration)."""

    def __init__(self, folder: str, unet_dir: str = "", device: str = "cpu"):
        root = Path(folder)
        for part in ("tokenizer", "text_encoder", "unet", "scheduler"):
            if not (root / part).is_dir():
                raise ConfigError(f"pipeline_dir: {folder!r} has no {part}/ folder (a diffusers pipeline layout)")
        try:
            import transformers
            from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ConfigError(f"backend: the diffusers backend needs diffusers and transformers ({err})") from None
        self.tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        # transformers 5 kernelizes layers from the hub by default: off (nothing is downloaded)
        offline = {"use_kernels": False} if int(transformers.__version__.split(".")[0]) >= 5 else {}
        self.text = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, **offline).eval()
        self.unet = UNet2DConditionModel.from_pretrained(unet_dir or root / "unet", local_files_only=True).eval()
        self.vae = (
            AutoencoderKL.from_pretrained(root / "vae", local_files_only=True).eval()
            if (root / "vae").is_dir()
            else None
        )
        self.scheduler = DDIMScheduler.from_config(
            json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        )
        self.device = torch.device(device)
        for module in (self.text, self.unet, self.vae):
            if module is not None:
                module.to(self.device)
                for p in module.parameters():
                    p.requires_grad_(False)

    @property
    def table(self) -> torch.Tensor:
        """The vocabulary: token embeddings ``[V, E]``."""
        return self.text.get_input_embeddings().weight.detach()

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        if resolution % factor:
            raise ConfigError(f"resolution: must be a multiple of the VAE's factor {factor}, got {resolution}")
        return (self.unet.config.in_channels, resolution // factor, resolution // factor)

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def prompt_ids(self, template: str, filler: str | None) -> tuple[torch.Tensor, int]:
        """Token ids ``[1, L]`` (L = the tokenizer's max length) of ``template`` with ``filler`` in its
        slot, and the slot's position (-1 when ``filler`` is a word; the slot holds a placeholder
        token, replaced by the attack embedding, when ``filler`` is None)."""
        tok = self.tokenizer
        before, after = template.split(SLOT) if SLOT in template else (template, "")
        if filler is not None:
            ids = tok((before + filler + after).strip(), add_special_tokens=False).input_ids
            slot = -1
        else:
            head = tok(before.strip(), add_special_tokens=False).input_ids if before.strip() else []
            tail = tok(after.strip(), add_special_tokens=False).input_ids if after.strip() else []
            slot = 1 + len(head)
            ids = head + [tok.eos_token_id] + tail  # placeholder at the slot (its row is replaced)
        length = tok.model_max_length
        ids = [tok.bos_token_id, *ids][: length - 1] + [tok.eos_token_id]
        if slot >= length - 1:
            raise ConfigError(f"templates: {template!r} leaves no room for the attack token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return torch.tensor([ids + [pad] * (length - len(ids))], device=self.device), slot

    def encode(
        self, ids: torch.Tensor, slot: int = -1, v_att: torch.Tensor | None = None, defense: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The text encoder's hidden states ``[B, L, H]`` of ``ids [B, L]``, with ``v_att [E]`` at
        position ``slot`` and every token embedding projected off ``defense [E, K]`` when given."""
        module = self.text.get_input_embeddings()

        def hook(_module, _inputs, out):
            if slot >= 0 and v_att is not None:
                v = v_att.to(device=out.device, dtype=out.dtype).expand(out.shape[0], 1, -1)
                out = torch.cat([out[:, :slot], v, out[:, slot + 1 :]], 1)
            if defense is not None:
                out = ul.project_out(out, defense.to(out.device))
            return out

        handle = module.register_forward_hook(hook)
        try:
            return self.text(input_ids=ids).last_hidden_state
        finally:
            handle.remove()


def _noisy(pipe: Pipeline, unet_scheduler, latents, g):
    """``(x_t, noise, t)``: DDPM forward noising of ``latents [B, ...]`` at uniform timesteps."""
    b = latents.shape[0]
    t = torch.randint(0, unet_scheduler.config.num_train_timesteps, (b,), generator=g)
    noise = torch.randn(latents.shape, generator=g).to(latents.device)
    t = t.to(latents.device)
    return unet_scheduler.add_noise(latents, noise, t), noise, t


SAMPLE_CHUNK = 16  # seeds per UNet batch (x2 with guidance); sample i depends on seed i only


def sample(pipe: Pipeline, unet, cond: torch.Tensor, null: torch.Tensor, seeds, c) -> torch.Tensor:
    """DDIM with classifier-free guidance; ``cond``/``null`` ``[1, L, H]``; images ``[len(seeds), 3,
    R, R]`` on the CPU, made ``SAMPLE_CHUNK`` seeds at a time."""
    seeds = list(seeds)
    return torch.cat(
        [
            _sample_chunk(pipe, unet, cond, null, seeds[i : i + SAMPLE_CHUNK], c)
            for i in range(0, len(seeds), SAMPLE_CHUNK)
        ]
    )


def _sample_chunk(pipe: Pipeline, unet, cond, null, seeds, c) -> torch.Tensor:
    shape = pipe.latent_shape(c.resolution)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(pipe.device)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(c.sampler_steps)
    x = x * sched.init_noise_sigma
    b = x.shape[0]
    both = torch.cat([null.expand(b, -1, -1), cond.expand(b, -1, -1)])
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps_null, eps_cond = unet(inp, t, encoder_hidden_states=both).sample.chunk(2)
            eps = eps_null + c.guidance_scale * (eps_cond - eps_null)
            x = sched.step(eps, t, x).prev_sample
        return pipe.to_images(x).cpu()


def _esd(pipe: Pipeline, c, latents, seed: int) -> dict:
    """ESD (Eq. 3, epsilon form) on a copy of the UNet; returns its state dict and loss curve."""
    import copy

    g = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(pipe.unet).train()
    if c.unlearn_params == "unet":
        trained = list(student.parameters())
    else:  # ESD-x: the cross-attention layers
        trained = [p for n, p in student.named_parameters() if "attn2" in n]
    for p in trained:
        p.requires_grad_(True)
    ids, _ = pipe.prompt_ids(SLOT, c.concept)
    null_ids, _ = pipe.prompt_ids(SLOT, "")
    with torch.no_grad():
        cond, null = pipe.encode(ids), pipe.encode(null_ids)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(latents.shape[0], (c.batch_size,), generator=g)
        x, _, t = _noisy(pipe, pipe.scheduler, latents[idx], g)
        b = x.shape[0]
        with torch.no_grad():
            e_cond = pipe.unet(x, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample
            e_null = pipe.unet(x, t, encoder_hidden_states=null.expand(b, -1, -1)).sample
        pred = student(x, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample
        return ul.esd_loss(pred, e_cond, e_null, c.eta, torch.ones(b, device=x.device))

    losses = ul.adam_steps(trained, c.unlearn_steps, c.unlearn_learning_rate, batch_loss)
    return {"unet": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}, "losses": losses}


def _attack_loss(pipe: Pipeline, unet, v_att, latents, c, g, template_ids, defense=None) -> torch.Tensor:
    """DDPM epsilon loss of the concept latents with ``<v_att>`` in a random template's slot (every
    token embedding projected off ``defense [E, K]`` when given)."""
    ids, slot = template_ids[int(torch.randint(len(template_ids), (1,), generator=g))]
    x, noise, t = _noisy(pipe, pipe.scheduler, latents, g)
    cond = pipe.encode(ids, slot, v_att, defense)
    pred = unet(x, t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1)).sample
    return ((pred - noise) ** 2).mean()


def _batch_loss(pipe: Pipeline, unet, c, latents, defense=None) -> ul.BatchLoss:
    """The attack loss of an embedding on a batch of the concept latents drawn with ``g``."""
    template_ids = [pipe.prompt_ids(t, None) for t in c.templates]

    def loss(v_att: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(latents.shape[0], (c.batch_size,), generator=g)
        return _attack_loss(pipe, unet, v_att, latents[idx], c, g, template_ids, defense)

    return loss


def _subspace(pipe: Pipeline, unet, c, latents, defense=None) -> dict:
    """SubAttack ``attack_k`` times (Eq. 5-6, :func:`diffcore.analysis.unlearning.subspace_attack`),
    each orthogonal to the earlier ones; trained through the projection ``defense`` when given (a
    fresh attack against the defended model)."""
    found = ul.subspace_attack(
        pipe.table,
        _batch_loss(pipe, unet, c, latents, defense),
        count=c.attack_k,
        hidden=c.attack_hidden,
        steps=c.attack_steps,
        learning_rate=c.attack_learning_rate,
        seed=c.attack_seed,
    )
    return found | {"vectors": found["vectors"].cpu(), "alphas": found["alphas"].cpu()}


def _attacks(pipe: Pipeline, unet, c, latents) -> dict:
    """The subspace attack and the free embedding (textual inversion: same loss, steps and start)."""
    free, free_curve = ul.free_attack(
        pipe.table,
        _batch_loss(pipe, unet, c, latents),
        hidden=c.attack_hidden,
        steps=c.attack_steps,
        learning_rate=c.attack_learning_rate,
        seed=c.attack_seed,
    )
    return _subspace(pipe, unet, c, latents) | {"free": free.cpu(), "free_losses": free_curve}


def sample_sets(c) -> list[dict]:
    """Every sample set: name, model (original | A | B), defense (none | attack | random), template
    index, filler (a word, or an attack token ``<sub1>``...), target class, role."""
    attacks = [f"<sub{k + 1}>" for k in range(c.attack_k)] + ["<free>"]
    others = list(zip(c.other_concepts, c.other_classes, strict=True))

    def plain(model, defense):
        out = [_set(model, defense, 0, c.concept, c.concept_class, "erased")]
        return out + [_set(model, defense, 0, w, k, "other") for w, k in others]

    sets = plain("original", "none") + plain("A", "none") + plain("B", "none")
    for i in range(len(c.templates)):
        sets += [_set("A", "none", i, a, c.concept_class, "attack") for a in attacks]
    sets += [_set("B", "none", 0, a, c.concept_class, "attack") for a in attacks]
    for defense in ("attack", "random"):
        sets += plain("A", defense) + [_set("A", defense, 0, a, c.concept_class, "attack") for a in attacks]
    sets += [_set("A", "attack", 0, f"<resub{k + 1}>", c.concept_class, "attack") for k in range(c.attack_k)]
    return sets


def _set(model, defense, template, filler, target, role) -> dict:
    label = f"{filler.strip('<>')}_t{template}" if role == "attack" else filler
    name = f"{model}-{defense}-{label}".replace(" ", "_")
    return {"name": name, "model": model, "defense": defense, "template": template, "filler": filler} | {
        "target": target,
        "role": role,
    }


def load_classifier(path: str):
    """The local classifier: a ``torch.export`` program (``.pt2``) or a TorchScript module (other
    suffixes); images ``[N, 3, H, W]`` in [-1, 1] -> logits ``[N, classes]``."""
    if Path(path).suffix == ".pt2":
        return torch.export.load(path).module()
    return torch.jit.load(path, map_location="cpu").eval()


def _load_state(ws: Workspace, kind: str, name: str, spec: dict, make) -> dict:
    def produce(tmp: Path, work: Path):
        state = make()
        torch.save(state, tmp / "state.pt")
        return {}

    unit = ws.run_unit(kind, name, spec, produce)
    return torch.load(unit.file("state.pt"), weights_only=False)


_EVAL_ONLY = ("cost_tolerance", "torch_threads", "grid_samples")
_SAMPLES_ONLY = ("samples_per_prompt", "sample_seed_start", "control_seed", "other_concepts", "other_classes")


def run(c, ws: Workspace, device: str = "cpu") -> dict:
    """The paper-scale run (see the module docstring); writes results.json into ``ws.root``."""
    import copy

    c.check_local_files()
    pipe = Pipeline(c.pipeline_dir, device=device)
    if c.attack_k > pipe.table.shape[1]:
        raise ConfigError(f"attack_k: at most the token embedding width {pipe.table.shape[1]}, got {c.attack_k}")
    classifier = load_classifier(c.classifier_path).to(pipe.device)
    spec_base = {k: v for k, v in dataclasses.asdict(c).items() if k not in _EVAL_ONLY}
    train_spec = {k: v for k, v in spec_base.items() if k not in _SAMPLES_ONLY}
    null_ids, _ = pipe.prompt_ids(SLOT, "")
    null = pipe.encode(null_ids).detach()

    def concept_images():
        ids, _ = pipe.prompt_ids(SLOT, c.concept)
        seeds = range(c.concept_seed_start, c.concept_seed_start + c.concept_images)
        return {"images": sample(pipe, pipe.unet, pipe.encode(ids).detach(), null, seeds, c).cpu()}

    images = _load_state(ws, "model", "concept-images", {**train_spec, "stage": "images"}, concept_images)["images"]
    with torch.no_grad():
        latents = pipe.to_latents(images.to(pipe.device))
    unets = {"original": pipe.unet}
    for tag, seed in zip(("A", "B"), c.unlearn_seeds, strict=True):
        if tag == "A" and c.unlearned_unet_dir:
            unets[tag] = Pipeline(c.pipeline_dir, c.unlearned_unet_dir, device).unet
            continue
        state = _load_state(
            ws,
            "model",
            f"unlearned-{seed}",
            {**train_spec, "stage": "unlearn", "seed": seed},
            lambda s=seed: _esd(pipe, c, latents, s),
        )
        unet = copy.deepcopy(pipe.unet)
        unet.load_state_dict(state["unet"])
        unets[tag] = unet.eval()
    for unet in unets.values():
        for p in unet.parameters():
            p.requires_grad_(False)
    att = _load_state(
        ws, "attack", "subspace", {**train_spec, "stage": "attack"}, lambda: _attacks(pipe, unets["A"], c, latents)
    )
    attack_basis = ul.orthonormal_basis(att["vectors"])
    resub = _load_state(
        ws,
        "attack",
        "subspace-defended",
        {**train_spec, "stage": "attack", "against": "attack-span defense"},
        lambda: _subspace(pipe, unets["A"], c, latents, attack_basis),
    )
    attacks = (
        {f"<sub{k + 1}>": att["vectors"][k] for k in range(c.attack_k)}
        | {"<free>": att["free"]}
        | {f"<resub{k + 1}>": resub["vectors"][k] for k in range(c.attack_k)}
    )
    defenses = unlearning.defense_bases(c, attack_basis, pipe.table.shape[1])
    seeds = range(c.sample_seed_start, c.sample_seed_start + c.samples_per_prompt)

    def make_samples(s: dict):
        template = c.templates[s["template"]]
        is_attack = s["filler"] in attacks
        ids, slot = pipe.prompt_ids(template, None if is_attack else s["filler"])
        with torch.no_grad():
            cond = pipe.encode(ids, slot, attacks.get(s["filler"]), defenses[s["defense"]])
            x = sample(pipe, unets[s["model"]], cond, null, seeds, c)
            chunks = x.split(SAMPLE_CHUNK)
            predicted = torch.cat([classifier(chunk.to(pipe.device)).argmax(1).cpu() for chunk in chunks])
        return x, predicted

    sets = sample_sets(c)
    stored = unlearning.sample_units(ws, sets, lambda s: {**spec_base, "stage": "samples", **s}, make_samples)
    results = _analyse(c, pipe, sets, stored, att, resub)
    _figure(c, results, ws.root)
    results = json.loads(json_dumps(results))
    atomic_write_json(ws.root / "results.json", results)
    return results


def _analyse(c, pipe: Pipeline, sets, stored, att, resub) -> dict:
    by_name = {s["name"]: s for s in sets}

    def rate(names, target_of) -> intervals.Interval:
        hits = sum(int((stored[n]["predicted"] == target_of(n)).sum()) for n in names)
        total = sum(int(stored[n]["predicted"].numel()) for n in names)
        return intervals.wilson_interval(hits, total)

    def asr(name):
        return rate([name], lambda _: c.concept_class)

    def others(model, defense):
        return [s["name"] for s in sets if (s["model"], s["defense"], s["role"]) == (model, defense, "other")]

    concept = c.concept.replace(" ", "_")
    claims: dict[str, dict] = {}
    before, a_base, b_base = asr(f"original-none-{concept}"), asr(f"A-none-{concept}"), asr(f"B-none-{concept}")
    claims["unlearning_lowers_concept"] = intervals.claim(
        intervals.clearly_below(a_base, before), original=before, unlearned=a_base
    )
    defended_name = asr(f"A-attack-{concept}")
    claims.update(ul.attack_claims(asr, c.attack_k, len(c.templates), a_base, b_base, defended_name, suffix="_t0"))
    cosine = ul.max_abs_cosine(att["vectors"])
    claims["attack_embeddings_orthogonal"] = intervals.claim(cosine < 1e-6, max_abs_cosine=cosine, tolerance=1e-6)
    other_accuracy = {}
    if c.other_concepts:
        for m, d in (("original", "none"), ("A", "none"), ("A", "attack"), ("A", "random")):
            other_accuracy[f"{m}/{d}"] = rate(others(m, d), lambda n: by_name[n]["target"]).as_dict()
        rows = (
            torch.cat(
                [
                    torch.stack(
                        [
                            stored[b]["predicted"] == by_name[b]["target"],
                            stored[a]["predicted"] == by_name[a]["target"],
                        ],
                        1,
                    )
                    for b, a in zip(sorted(others("A", "none")), sorted(others("A", "attack")), strict=True)
                ]
            )
            .double()
            .numpy()
        )
        drop = intervals.bootstrap_interval(rows, lambda r: float(r[:, 0].mean() - r[:, 1].mean()))
        claims["defense_keeps_other_concepts"] = intervals.claim(
            drop.high < c.cost_tolerance, accuracy_drop=drop, tolerance=c.cost_tolerance
        )
    tokens = pipe.tokenizer.convert_ids_to_tokens(list(range(pipe.table.shape[0])))

    def top_tokens(alphas) -> list[dict]:
        out = []
        for k, alpha in enumerate(alphas):
            order = torch.argsort(alpha, descending=True)[:5].tolist()
            top = [{"token": tokens[i], "alpha": float(alpha[i])} for i in order]
            out.append({"embedding": k + 1, "top": top, "nonzero": int((alpha > 0).sum())})
        return out

    return {
        "experiment": "unlearning",
        "backend": "diffusers",
        "config": dataclasses.asdict(c),
        "attack_success": {s["name"]: asr(s["name"]).as_dict() for s in sets},
        "other_concept_accuracy": other_accuracy,
        "top_tokens": top_tokens(att["alphas"]),
        "retrained_top_tokens": top_tokens(resub["alphas"]),
        "max_abs_cosine": cosine,
        "claims": claims,
        "losses": unlearning.final_losses(att["losses"], att["free_losses"], resub["losses"]),
    }


def _figure(c, results: dict, out: Path) -> None:
    """Attack success of every sample set with its 95% Wilson interval (``unlearning-success.png``)."""
    rates = results["attack_success"]
    unlearning.plot_attack_success(
        rates,
        [(name, name) for name in rates],
        out / "unlearning-success.png",
        figsize=(7, 0.5 + 0.22 * len(rates)),
        label_size=6,
        xlabel=f"attack success: fraction classified as class {c.concept_class} (95% Wilson)",
        title=f"Erased concept {c.concept!r}, n = {c.samples_per_prompt} per prompt",
    )


__all__ = ["Pipeline", "run", "sample", "sample_sets"]
