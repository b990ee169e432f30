"""Propositions 1 and 2, numerically: the minimiser of the PRISM loss.

Data: length-4 sequences over 3 symbols with a fixed random joint p(x), so every conditional is
computable by enumeration. The quality model is a lookup table over all 4^4 partially masked
sequences (it can represent any g).
- Proposition 1 (k = 1): trained through the library's masking process, y-construction and PRISM loss,
  with two proposals f (the exact unmasking posterior and a useless uniform one), g reaches
  p(x_i = y_i | y with i masked) either way.
- Proposition 2 (k = 2): trained through `compute_losses` (the training step the engine runs) with the
  table as a model, g reaches E_S[p(x_i = y_i | y with S masked)], computed here by enumerating the
  whole joint of (x, z, S, y).
"""
import itertools

import pytest
import torch

from prism_ds.config import MaskingConfig, PrismConfig
from prism_ds.core.loss import prism_loss
from prism_ds.core.masking import mask_tokens
from prism_ds.core.objective import compute_losses
from prism_ds.core.y_construction import build_y
from prism_ds.models.prism_model import PrismOutput

L, V, MASK = 4, 3, 0  # symbols are 1..3, 0 is the mask
TOL = 0.03


def _index(seqs: torch.Tensor) -> torch.Tensor:
    """Base-4 index of sequences over {mask, 1, 2, 3}."""
    return (seqs * (4 ** torch.arange(L - 1, -1, -1))).sum(-1)


@pytest.fixture(scope="module")
def world():
    gen = torch.Generator().manual_seed(0)
    support = torch.tensor(list(itertools.product(range(1, V + 1), repeat=L)))  # [81, 4]
    p = torch.softmax(2.0 * torch.randn(len(support), generator=gen, dtype=torch.float64), 0)
    all_z = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # [256, 4], 0 = mask
    # posterior[z, i, v] = p(x_i = v | z) for every partially masked z (uniform if z is impossible).
    consistent = ((all_z[:, None] == support[None]) | (all_z[:, None] == MASK)).all(-1)  # [256, 81]
    weight = consistent * p[None]
    onehot = torch.nn.functional.one_hot(support, V + 1).double()  # [81, 4, 4]
    posterior = torch.einsum("zs,siv->ziv", weight, onehot)
    posterior = posterior / posterior.sum(-1, keepdim=True).clamp_min(1e-300)
    return support, p, all_z, posterior


def exact_quality(y: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """g*_i(y) = p(x_i = y_i | y with position i masked), for every position: [B, L]."""
    out = torch.zeros(y.shape, dtype=torch.float64)
    for i in range(L):
        z = y.clone()
        z[:, i] = MASK
        out[:, i] = posterior[_index(z), i].gather(-1, y[:, i:i + 1]).squeeze(-1)
    return out


def draw_pairs(world, proposal: str, batch: int, gen: torch.Generator):
    """One PRISM training batch: x ~ p, z by masking, (y, i) by y-construction with the given proposal."""
    support, p, _, posterior = world
    x = support[torch.multinomial(p.float(), batch, replacement=True, generator=gen)]
    mb = mask_tokens(x, torch.zeros_like(x, dtype=torch.bool), MASK, eps=1e-3, generator=gen)
    if proposal == "exact":
        logits = posterior[_index(mb.z)].clamp_min(1e-12).log()
    else:  # uniform over the 3 symbols, ignoring z entirely
        logits = torch.zeros(batch, L, V + 1, dtype=torch.float64)
    logits[..., MASK] = float("-inf")
    return build_y(x, mb.z, mb.masked, logits, k=1, generator=gen)


def train_table(world, proposal: str, steps: int = 1500, batch: int = 4096) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    table = torch.zeros(4 ** L, L, requires_grad=True)
    opt = torch.optim.Adam([table], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        yb = draw_pairs(world, proposal, batch, gen)
        loss = prism_loss(table[_index(yb.y)], yb.label, yb.chosen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return table.detach()


def weighted_error(world, table: torch.Tensor, proposal: str) -> float:
    """Mean |sigmoid(g) - g*| over (y, i) pairs drawn from the training distribution itself."""
    gen = torch.Generator().manual_seed(2)
    errs = []
    for _ in range(20):
        yb = draw_pairs(world, proposal, 10_000, gen)
        learned = torch.sigmoid(table[_index(yb.y)]).double()
        errs.append((learned - exact_quality(yb.y, world[3]))[yb.chosen].abs())
    return torch.cat(errs).mean().item()


@pytest.fixture(scope="module")
def tables(world):
    return {proposal: train_table(world, proposal) for proposal in ("exact", "uniform")}


def test_learned_quality_matches_exact_posterior(world, tables):
    err = weighted_error(world, tables["exact"], "exact")
    print(f"mean |g - g*| with the exact proposal: {err:.6f}")
    assert err < TOL


def test_minimiser_does_not_depend_on_the_proposal(world, tables):
    err = weighted_error(world, tables["uniform"], "uniform")
    print(f"mean |g - g*| with a uniform proposal: {err:.6f}")
    assert err < TOL
    # Both tables estimate the same function where both proposals put enough mass.
    gen = torch.Generator().manual_seed(3)
    yb = draw_pairs(world, "exact", 20_000, gen)
    a = torch.sigmoid(tables["exact"][_index(yb.y)])[yb.chosen]
    b = torch.sigmoid(tables["uniform"][_index(yb.y)])[yb.chosen]
    assert (a - b).abs().mean().item() < 2 * TOL


def test_untrained_quality_is_far_from_exact(world):
    """Guard: the metric can fail (a constant 0.5 is far from g*)."""
    assert weighted_error(world, torch.zeros(4 ** L, L), "exact") > 0.2


# ---- Proposition 2: k = 2 through compute_losses -------------------------------------------------
K2, EPS = 2, 1e-3


class TableModel(torch.nn.Module):
    """A backbone + head made of lookup tables: fixed unmasking logits, learnable quality per (state, position)."""

    def __init__(self, logits_table: torch.Tensor):
        super().__init__()
        self.register_buffer("logits_table", logits_table)
        self.quality = torch.nn.Parameter(torch.zeros(4 ** L, L))

    def forward(self, tokens, need_logits=True, need_quality=True):
        idx = _index(tokens)
        return PrismOutput(logits=self.logits_table[idx] if need_logits else None,
                           quality=self.quality[idx] if need_quality else None)


def _pattern_prob(n_masked: int) -> float:
    """P(a given set of n positions is exactly the masked set) under t ~ U(eps, 1), mask prob (1 - eps) t."""
    t = torch.linspace(EPS, 1, 200_001, dtype=torch.float64)
    q = (1 - EPS) * t
    return torch.trapezoid(q ** n_masked * (1 - q) ** (L - n_masked), t).item() / (1 - EPS)


def exact_minimiser_k2(world, proposal: str) -> dict:
    """g*(y, i) = P(x_i = y_i | y, i in S) by enumerating x, the mask set, the k-subset S and the filled tokens."""
    support, p, _, posterior = world
    num, den = {}, {}
    for x, px in zip(support.tolist(), p.tolist()):
        for masked in itertools.chain.from_iterable(itertools.combinations(range(L), n) for n in range(1, L + 1)):
            z = [MASK if j in masked else v for j, v in enumerate(x)]
            pz = px * _pattern_prob(len(masked))
            f = posterior[_index(torch.tensor(z))] if proposal == "exact" else torch.full((L, V + 1), 1.0 / V)
            subsets = list(itertools.combinations(masked, min(K2, len(masked))))
            for S in subsets:
                for fill in itertools.product(range(1, V + 1), repeat=len(S)):
                    y = list(z)
                    w = pz / len(subsets)
                    for j, v in zip(S, fill):
                        y[j] = v
                        w *= float(f[j, v])
                    key_y = int(_index(torch.tensor(y)))
                    for j in S:
                        num[key_y, j] = num.get((key_y, j), 0.0) + w * (x[j] == y[j])
                        den[key_y, j] = den.get((key_y, j), 0.0) + w
    return {key: (num[key] / den[key], den[key]) for key in den}


def _logits_table(world, proposal: str) -> torch.Tensor:
    posterior = world[3]
    table = posterior.clamp_min(1e-12).log() if proposal == "exact" else torch.zeros_like(posterior)
    table[..., MASK] = float("-inf")
    return table.float()


@pytest.mark.parametrize("proposal", ["exact", "uniform"])
def test_proposition2_minimiser_through_compute_losses(world, proposal):
    target = exact_minimiser_k2(world, proposal)
    model = TableModel(_logits_table(world, proposal))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    steps = 1000
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(5)
    support, p = world[0], world[1]
    cfg = PrismConfig(k=K2, n_y=1, y_positions="random", nucleus_p=1.0, temperature=1.0, lam=0.0)
    for _ in range(steps):
        x = support[torch.multinomial(p.float(), 4096, replacement=True, generator=gen)]
        losses = compute_losses(model, x, torch.zeros_like(x, dtype=torch.bool), MASK, "prism",
                                MaskingConfig(eps=EPS, antithetic=False), cfg, generator=gen)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        sched.step()
    learned = torch.sigmoid(model.quality.detach()).double()
    weights = torch.tensor([w for _, w in target.values()])
    err = torch.tensor([abs(learned[y, i] - g) for (y, i), (g, _) in target.items()])
    mean_err = float((weights * err).sum() / weights.sum())
    print(f"Proposition 2, {proposal} proposal: weighted mean |g - g*| = {mean_err:.4f}")
    assert mean_err < TOL
    # Guard: k = 2's minimiser is not Proposition 1's p(x_i = y_i | y with only i masked), so the test tells them apart.
    k1 = {(y, i): float(exact_quality(_unindex(y)[None], world[3])[0, i]) for (y, i) in target}
    gap = sum(w * abs(g - k1[key]) for key, (g, w) in target.items()) / float(weights.sum())
    print(f"  mean |g*_k=2 - g*_k=1| = {gap:.4f}")
    assert gap > 3 * TOL, gap


def _unindex(index: int) -> torch.Tensor:
    return torch.tensor([(index // 4 ** (L - 1 - j)) % 4 for j in range(L)])
