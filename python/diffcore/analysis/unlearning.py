"""Unlearning, interpretable attack embeddings and the subspace defense (docs/papers.md section 10).

The pieces of the ``unlearning`` study that are mathematics rather than bookkeeping:

- :class:`Vocabulary`: the digits' token vocabulary (each digit's name in three forms, attribute
  tokens computed from each image, neutral filler tokens) and :func:`image_attributes`, the
  attribute bins of an image;
- :class:`TextEncoder`: token embeddings ``[V, E]`` -> mean pooling over a prompt's tokens -> MLP ->
  a conditioning vector ``[C]`` that the UNet reads through its label projection (``map_label``);
- :func:`esd_target` / :func:`esd_loss`: ESD's negative-guidance target (Gandikota et al. 2023; the
  paper's Eq. 3 as listed in docs/papers.md): ``D'(x, c) -> D(x, null) - eta (D(x, c) - D(x, null))``;
- :class:`CoefficientNet` and :func:`attack_embedding`: SubAttack, ``v_att = P sum_i alpha_i v_i``
  with ``alpha_i = g(v_i) >= 0`` (ReLU output), ``P`` the projection onto the orthogonal complement
  of the earlier attack embeddings (identity for the first);
- :func:`orthonormal_basis` (Gram-Schmidt in float64) and :func:`project_out`, the defense
  ``e -> e - Q Q^T e`` on every conditioning token embedding;
- :func:`subspace_attack` and :func:`free_attack`: the attacks' optimization, for any model (the
  digits' and a diffusers pipeline's), given the loss of an attack embedding on a drawn batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ROMAN = ("nulla", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX")  # Roman has no zero: "nulla"
NAME_FORMS = ("numeral", "word", "roman")
ATTRIBUTES = {  # attribute -> its three bins' tokens (tertiles over the dataset)
    "mass": ("thin", "regular", "bold"),
    "size": ("small", "medium", "large"),
    "slant": ("leftward", "upright", "rightward"),
}
FILLERS = ("a", "the", "image", "of", "digit", "picture")
PAD = -1  # token id of an empty prompt slot


def digit_name(digit: int, form: str) -> str:
    """The token of ``digit`` (0..9) in ``form`` (numeral | word | roman)."""
    if form == "numeral":
        return str(digit)
    if form == "word":
        return DIGIT_WORDS[digit]
    if form == "roman":
        return ROMAN[digit]
    raise ValueError(f"form: expected one of {', '.join(NAME_FORMS)}, got {form!r}")


@dataclass(frozen=True)
class Vocabulary:
    """The token list: 30 digit names (digit-major: digit d's forms at ``3 d + form``), 9 attribute
    tokens, 6 fillers. ``id(token)`` raises ValueError naming an unknown token."""

    tokens: tuple[str, ...]

    @classmethod
    def digits(cls) -> Vocabulary:
        names = tuple(digit_name(d, f) for d in range(10) for f in NAME_FORMS)
        attrs = tuple(t for bins in ATTRIBUTES.values() for t in bins)
        return cls(names + attrs + FILLERS)

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        try:
            return self.tokens.index(token)
        except ValueError:
            raise ValueError(f"token: {token!r} is not in the vocabulary") from None

    def name_id(self, digit: int, form: str) -> int:
        return self.id(digit_name(digit, form))

    def digit_of(self) -> list[int | None]:
        """Per token: the digit it names, or None (attributes, fillers)."""
        out: list[int | None] = [None] * len(self.tokens)
        for d in range(10):
            for f in NAME_FORMS:
                out[self.name_id(d, f)] = d
        return out


def image_attributes(images: torch.Tensor) -> torch.Tensor:
    """Raw attributes of ``images [N, 1, H, W]`` in [-1, 1]: ``[N, 3]`` = (stroke mass: mean ink,
    size: RMS radius of the ink around its centroid, slant: ink-weighted regression slope of column
    on row, positive = top to the right)."""
    ink = ((images[:, 0].double() + 1) / 2).clamp(min=0)  # [N, H, W]
    n, h, w = ink.shape
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1).expand(n, h, w)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w).expand(n, h, w)
    total = ink.sum((1, 2)).clamp(min=1e-9)
    r0 = (ink * rows).sum((1, 2)) / total
    c0 = (ink * cols).sum((1, 2)) / total
    dr = rows - r0.view(n, 1, 1)
    dc = cols - c0.view(n, 1, 1)
    var_r = (ink * dr * dr).sum((1, 2)) / total
    size = ((ink * (dr * dr + dc * dc)).sum((1, 2)) / total).sqrt()
    slant = -(ink * dr * dc).sum((1, 2)) / total / var_r.clamp(min=1e-9)  # rows grow downwards
    return torch.stack([ink.mean((1, 2)), size, slant], 1)


def attribute_bins(raw: torch.Tensor, edges: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tertile bins ``[N, 3]`` (0, 1, 2) of raw attributes ``[N, 3]`` and the edges ``[3, 2]`` used
    (computed from ``raw`` when None)."""
    if edges is None:
        edges = torch.quantile(raw, torch.tensor([1 / 3, 2 / 3], dtype=raw.dtype), dim=0).T.contiguous()
    bins = (raw.unsqueeze(-1) > edges.unsqueeze(0)).sum(-1)
    return bins, edges


def attribute_token_ids(vocab: Vocabulary, bins: torch.Tensor) -> torch.Tensor:
    """Token ids ``[N, 3]`` of attribute bins ``[N, 3]``."""
    table = torch.tensor([[vocab.id(t) for t in toks] for toks in ATTRIBUTES.values()])  # [3, 3]
    return table[torch.arange(3).view(1, 3), bins.long()]


class TextEncoder(nn.Module):
    """Token embeddings ``[V, E]`` and ``encode(embeddings [B, L, E], mask [B, L]) -> [B, C]``:
    the mean of the prompt's token embeddings, then Linear(E, H) - SiLU - Linear(H, C)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, cond_dim: int, generator=None):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab_size, embed_dim, generator=generator))
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, cond_dim))

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` (``PAD`` = empty) -> (embeddings [B, L, E], mask [B, L])."""
        mask = ids != PAD
        return self.table[ids.clamp(min=0)] * mask.unsqueeze(-1), mask

    def encode(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(embeddings.dtype).unsqueeze(-1)
        pooled = (embeddings * m).sum(1) / m.sum(1).clamp(min=1)
        return self.mlp(pooled)


def esd_target(d_cond: torch.Tensor, d_null: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's negative-guidance target ``D(x, null) - eta (D(x, c) - D(x, null))`` (Eq. 3)."""
    return d_null - eta * (d_cond - d_null)


def esd_loss(
    student_cond: torch.Tensor, d_cond: torch.Tensor, d_null: torch.Tensor, eta: float, weight: torch.Tensor
) -> torch.Tensor:
    """``mean(weight |D'(x, c) - esd_target|^2)``; ``weight [B]`` (EDM's lambda(sigma)), tensors
    ``[B, ...]``; the teacher's predictions carry no gradient."""
    target = esd_target(d_cond.detach(), d_null.detach(), eta)
    per = ((student_cond - target) ** 2).flatten(1).mean(1)
    return (weight * per).mean()


def init_alpha(vocab_size: int) -> float:
    """The start of every alpha: the attack starts at ``sum_i v_i / sqrt(V)``."""
    return 1.0 / math.sqrt(vocab_size)


class CoefficientNet(nn.Module):
    """SubAttack's ``g``: ``alpha_i = ReLU(MLP(v_i)) >= 0`` for each vocabulary embedding ``v_i``
    (``[V, E] -> [V]``). The last bias starts at ``init_alpha`` so that every alpha starts positive."""

    def __init__(self, embed_dim: int, hidden: int, init_alpha: float, generator=None):
        super().__init__()
        self.hidden = nn.Linear(embed_dim, hidden)
        self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            if generator is not None:
                for layer in (self.hidden, self.out):
                    bound = 1 / layer.in_features**0.5
                    layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
                    layer.bias.zero_()
            self.out.weight.mul_(0.1)
            self.out.bias.fill_(init_alpha)

    def forward(self, vocabulary: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.out(torch.nn.functional.silu(self.hidden(vocabulary)))).squeeze(-1)


def orthonormal_basis(vectors: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Gram-Schmidt (twice, float64) of the rows of ``vectors [K, E]``: ``Q [E, K']`` with
    orthonormal columns spanning them (rows whose remainder is below ``tol`` times their norm are
    dropped)."""
    cols: list[torch.Tensor] = []
    for v in vectors.double():
        r = v.clone()
        for _ in range(2):
            for q in cols:
                r = r - (q @ r) * q
        if float(r.norm()) > tol * max(float(v.norm()), 1e-300):
            cols.append(r / r.norm())
    if not cols:
        return torch.zeros(vectors.shape[-1], 0, dtype=torch.float64)
    return torch.stack(cols, 1)


def project_out(embeddings: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The defense: ``e - Q Q^T e`` for every row of ``embeddings [..., E]`` (``basis`` ``[E, K]``
    orthonormal), computed in float64 and returned in the embeddings' dtype."""
    if basis.shape[1] == 0:
        return embeddings
    e = embeddings.double()
    q = basis.double()
    return (e - (e @ q) @ q.T).to(embeddings.dtype)


def attack_embedding(alpha: torch.Tensor, vocabulary: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """``v_att = P sum_i alpha_i v_i`` (``alpha [V]``, ``vocabulary [V, E]``; ``P`` removes the span
    of ``basis [E, K]``, the earlier attack embeddings of a subspace attack)."""
    v = alpha @ vocabulary
    if basis is None or basis.shape[1] == 0:
        return v
    q = basis.to(v.dtype)
    return v - q @ (q.T @ v)


BatchLoss = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""``loss(v_att [E], g)``: an attack's loss with embedding ``v_att`` on a batch drawn with ``g``."""


def adam_steps(
    params: Iterable[torch.Tensor], steps: int, learning_rate: float, loss: Callable[[], torch.Tensor]
) -> list[float]:
    """``steps`` Adam steps on ``params`` minimizing ``loss()`` (a fresh batch each call); the
    loss of every step."""
    opt = torch.optim.Adam(params, lr=learning_rate)
    curve = []
    for _ in range(steps):
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        curve.append(float(value.detach()))
    return curve


def _start_coefficients(vocabulary: torch.Tensor, hidden: int, generator: torch.Generator) -> CoefficientNet:
    """A fresh ``g`` for ``vocabulary [V, E]``, weights drawn from ``generator``, on its device."""
    net = CoefficientNet(vocabulary.shape[1], hidden, init_alpha(vocabulary.shape[0]), generator=generator)
    return net.to(vocabulary.device)


def subspace_attack(
    vocabulary: torch.Tensor,
    batch_loss: BatchLoss,
    *,
    count: int,
    hidden: int,
    steps: int,
    learning_rate: float,
    seed: int,
) -> dict:
    """SubAttack ``count`` times (Eq. 5-6): the k-th ``v_k = P_k sum_i g_k(v_i) v_i``, ``P_k``
    removing the span of ``v_1..v_{k-1}``; only ``g_k`` trains (Adam, ``steps`` steps of
    ``batch_loss``), its weights and batches drawn from a generator seeded ``seed * 1000 + k``.
    ``vocabulary [V, E]`` (detached). Returns vectors [K, E] (float64), alphas [K, V] (float64),
    losses [K][steps]."""
    vectors: list[torch.Tensor] = []
    alphas, losses = [], []
    for k in range(count):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        basis = orthonormal_basis(torch.stack(vectors)) if vectors else None
        alpha, curve = _train_coefficients(vocabulary, basis, batch_loss, hidden, steps, learning_rate, g)
        vectors.append(attack_embedding(alpha, vocabulary.double(), basis))
        alphas.append(alpha)
        losses.append(curve)
    return {"vectors": torch.stack(vectors), "alphas": torch.stack(alphas), "losses": losses}


def _train_coefficients(
    vocabulary: torch.Tensor,
    basis: torch.Tensor | None,
    batch_loss: BatchLoss,
    hidden: int,
    steps: int,
    learning_rate: float,
    g: torch.Generator,
) -> tuple[torch.Tensor, list[float]]:
    """One SubAttack ``g_k`` trained through the projection off ``basis [E, K]`` (None: none):
    its alphas [V] (float64) and the loss of every step."""
    coef = _start_coefficients(vocabulary, hidden, g)
    curve = adam_steps(
        coef.parameters(),
        steps,
        learning_rate,
        lambda: batch_loss(attack_embedding(coef(vocabulary), vocabulary, basis), g),
    )
    with torch.no_grad():
        return coef(vocabulary).double(), curve


def free_attack(
    vocabulary: torch.Tensor, batch_loss: BatchLoss, *, hidden: int, steps: int, learning_rate: float, seed: int
) -> tuple[torch.Tensor, list[float]]:
    """Textual inversion: a free embedding ``v [E]`` trained by the same loss, steps, learning rate
    and start as :func:`subspace_attack`'s first (generator seeded ``seed * 1000``). Returns
    ``v`` (float64) and the loss of every step."""
    g = torch.Generator().manual_seed(seed * 1000)
    start = _start_coefficients(vocabulary, hidden, g)
    with torch.no_grad():
        v = nn.Parameter(attack_embedding(start(vocabulary), vocabulary).clone())
    curve = adam_steps([v], steps, learning_rate, lambda: batch_loss(v, g))
    return v.detach().double(), curve


def max_abs_cosine(vectors: torch.Tensor) -> float:
    """The largest |cos| between two different rows of ``vectors [K, E]`` (float64; 0 for K < 2)."""
    v = vectors.double()
    v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-300)
    g = (v @ v.T).abs()
    g.fill_diagonal_(0)
    return float(g.max()) if v.shape[0] > 1 else 0.0


__all__ = [
    "ATTRIBUTES",
    "FILLERS",
    "NAME_FORMS",
    "PAD",
    "CoefficientNet",
    "TextEncoder",
    "Vocabulary",
    "adam_steps",
    "attack_embedding",
    "attribute_bins",
    "attribute_token_ids",
    "digit_name",
    "esd_loss",
    "esd_target",
    "free_attack",
    "image_attributes",
    "init_alpha",
    "max_abs_cosine",
    "orthonormal_basis",
    "project_out",
    "subspace_attack",
]


def attack_claims(
    asr, attack_k: int, templates: int, a_base, b_base, defended_name, suffix: str = "", undefended_reference=False
) -> dict[str, dict]:
    """The attack, transfer and defense claims of the unlearning study, shared by the digits and the
    paper backends. ``asr(name)`` is the attack success (an Interval) of the sample set ``name``;
    sets are named ``{model}-{defense}-{token}`` with template ``_t{i}`` (``suffix``: what the
    backend appends to the sets that use only template 0, ``""`` or ``"_t0"``). ``a_base`` /
    ``b_base``: the erased name on unlearned models A / B; ``defended_name``: on A behind the
    defense. ``undefended_reference``: also record each original attack's undefended success."""
    from diffcore.metrics import intervals

    claims: dict[str, dict] = {}
    for a in [f"sub{k + 1}" for k in range(attack_k)] + ["free"]:
        per_template = {f"t{i}": asr(f"A-none-{a}_t{i}") for i in range(templates)}
        claims[f"{a}_recovers_on_A"] = intervals.claim(
            intervals.clearly_above(per_template["t0"], a_base), attacked=per_template["t0"], erased_name=a_base
        )
        claims[f"{a}_robust_across_templates"] = intervals.claim(
            all(intervals.clearly_above(v, a_base) for v in per_template.values()), erased_name=a_base, **per_template
        )
        transfer = asr(f"B-none-{a}{suffix}")
        claims[f"{a}_transfers_to_B"] = intervals.claim(
            intervals.clearly_above(transfer, b_base), attacked=transfer, erased_name=b_base
        )
        undefended, defended, ctrl = asr(f"A-none-{a}_t0"), asr(f"A-attack-{a}{suffix}"), asr(f"A-random-{a}{suffix}")
        claims[f"defense_lowers_{a}"] = intervals.claim(
            intervals.clearly_below(defended, undefended), undefended=undefended, defended=defended, random_control=ctrl
        )
        claims[f"defense_beats_random_on_{a}"] = intervals.claim(
            intervals.clearly_below(defended, ctrl), defended=defended, random_control=ctrl
        )
    for k in range(1, attack_k + 1):  # a fresh attack trained through the defense
        retrained = asr(f"A-attack-resub{k}{suffix}")
        extra = {"original_attack_undefended": asr(f"A-none-sub{k}_t0")} if undefended_reference else {}
        claims[f"retrained_sub{k}_recovers_after_defense"] = intervals.claim(
            intervals.clearly_above(retrained, defended_name),
            retrained=retrained,
            erased_name_defended=defended_name,
            original_attack_defended=asr(f"A-attack-sub{k}{suffix}"),
            **extra,
        )
    return claims
