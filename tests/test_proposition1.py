"""Proposition 1, numerically: the PRISM loss (k = 1) is minimised by g_i(y) = p(x_i = y_i | y with i masked).

Data: length-4 sequences over 3 symbols with a fixed random joint p(x), so every conditional is
computable by enumeration. The quality model is a lookup table over all 4^4 partially masked
sequences (it can represent any g), trained only through the library's masking process,
y-construction and PRISM loss. Two proposals f build y: the exact unmasking posterior and a
deliberately useless uniform one; both must reach the same exact per-token quality.
"""
import itertools

import pytest
import torch

from prism_ds.core.loss import prism_loss
from prism_ds.core.masking import mask_tokens
from prism_ds.core.y_construction import build_y

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
