"""Sampler properties on tiny sequences with a scripted model that records every state it is shown."""
import pytest
import torch

from prism_ds.core.sampler import SamplerSettings, sample
from prism_ds.core.schedules import EvenSchedule, sigma_max
from prism_ds.models.prism_model import PrismOutput

MASK, V, L = 0, 5, 12


class ScriptedModel(torch.nn.Module):
    """Logits and quality from fixed tables (optionally a different table per call); records inputs."""

    def __init__(self, logits: torch.Tensor, quality: torch.Tensor | None = None, per_call=None):
        super().__init__()
        self.logits, self.quality, self.per_call, self.states = logits, quality, per_call, []

    def forward(self, tokens, need_logits=True, need_quality=True):
        self.states.append(tokens.clone())
        logits = self.per_call(len(self.states) - 1) if self.per_call else self.logits
        quality = self.quality.expand(tokens.shape).clone() if (need_quality and self.quality is not None) else None
        return PrismOutput(logits=logits.expand(*tokens.shape, V).clone(), quality=quality)


def _start(batch=64):
    tokens = torch.zeros(batch, L, dtype=torch.long)
    fixed = torch.zeros(batch, L, dtype=torch.bool)
    fixed[:, :3] = True
    tokens[:, :3] = torch.tensor([1, 2, 3])
    return tokens, fixed


def _run(policy, k=2, steps=5, quality=None, logits=None, per_call=None, order="random", seed=0, batch=64,
         count="fixed", eta=1.0, model=None):
    tokens, fixed = _start(batch)
    logits = torch.randn(L, V, generator=torch.Generator().manual_seed(9)) if logits is None else logits
    model = model or ScriptedModel(logits, quality, per_call)
    schedule = EvenSchedule(remask_count=count, remask_k=k, eta=eta)
    out = sample(model, tokens, fixed, SamplerSettings(MASK, steps, schedule, policy=policy, unmask_order=order),
                 generator=torch.Generator().manual_seed(seed))
    return model.states + [out], fixed


def _transitions(states):
    for before, after in zip(states[:-1], states[1:]):
        yield before, after, (before != MASK) & (after == MASK), (before == MASK) & (after != MASK)


@pytest.mark.parametrize("count", ["fixed", "binomial", "per-token"])
@pytest.mark.parametrize("policy", ["none", "prism", "remdm", "remdm-conf"])
def test_every_policy_keeps_fixed_tokens_and_finishes_in_n_steps(policy, count):
    quality = torch.randn(L)
    states, fixed = _run(policy, quality=quality, count=count, eta=0.5)
    assert len(states) == 6  # 5 forward passes, then the result
    for s in states:
        assert torch.equal(s[fixed], states[0][fixed])
    assert (states[-1] != MASK).all()
    # Counted remasking never outpaces unmasking: the number of masks strictly falls every step. (Per-token
    # draws may remask more than are left to unmask, as in ReMDM; the last step still fills everything.)
    masked_counts = torch.stack([(s == MASK).sum(1) for s in states])
    if count != "per-token" or policy == "none":
        assert (masked_counts.diff(dim=0) < 0).all()


def test_vanilla_never_changes_a_generated_token():
    states, _ = _run("none")
    for before, after, remasked, _ in _transitions(states):
        assert not remasked.any()
        clean = before != MASK
        assert torch.equal(after[clean], before[clean])


def test_prism_remasks_exactly_the_k_lowest_quality_clean_tokens_while_active():
    quality = torch.randn(L, generator=torch.Generator().manual_seed(3))
    states, fixed = _run("prism", k=2, steps=5, quality=quality)
    active_steps = 0
    for before, after, remasked, _ in _transitions(states):
        eligible = (before != MASK) & ~fixed
        generated, target = eligible.sum(1), (~fixed).sum(1)
        active = (generated > 2) & (generated < target - 2)
        if remasked.any():
            active_steps += 1
        for row in range(before.shape[0]):
            got = set(remasked[row].nonzero().flatten().tolist())
            if not active[row] or before is states[-2]:
                assert not got
                continue
            q = quality.masked_fill(~eligible[row], float("inf"))
            assert got == set(q.topk(2, largest=False).indices.tolist())
    assert active_steps >= 2


def test_remask_counts_window():
    """K remasks exactly while K < #generated < #blanks - K (never on the last step), none otherwise;
    a token remasked in a step is not refilled in that step."""
    states, fixed = _run("remdm", k=2, steps=5)
    for i, (before, after, remasked, unmasked) in enumerate(_transitions(states)):
        generated = ((before != MASK) & ~fixed).sum(1)
        active = (generated > 2) & (generated < 9 - 2) & (i < 4)
        assert torch.equal(remasked.sum(1), torch.where(active, 2, 0))
        assert not (remasked & unmasked).any()


def test_remdm_remasks_uniformly_among_generated_tokens():
    counts = torch.zeros(L)
    states, fixed = _run("remdm", k=1, steps=3, batch=4000, quality=None)
    for _, _, remasked, _ in _transitions(states):
        counts += remasked.sum(0)
    free = counts[3:]
    assert counts[:3].sum() == 0
    assert free.min() > 0.75 * free.mean() and free.max() < 1.25 * free.mean()


def _sure_then_unsure(i):
    """Step 0 is sure of token 1 everywhere (p ~ 1); every later step is uniform over the V - 1 non-mask tokens."""
    sure = torch.full((V,), -10.0)
    sure[1] = 10.0
    return (sure if i == 0 else torch.zeros(V)).expand(L, V)


def test_remdm_conf_remasks_the_lowest_confidence_at_unmask_time_not_the_current_one():
    """Tokens unmasked at step 0 had confidence ~1, later ones 1/(V-1). With fixed K, remdm-conf must remask
    a later token whenever there is one; the authors' code, which overwrote confidences with the current
    (uniform) probability every step, would pick step-0 tokens about as often as any other."""
    states, fixed = _run("remdm-conf", k=1, steps=6, batch=2000, per_call=_sure_then_unsure)
    origin = torch.full(states[0].shape, -1)
    checked = 0
    for i, (before, _, remasked, unmasked) in enumerate(_transitions(states)):
        later = (before != MASK) & ~fixed & (origin > 0)
        rows = remasked.any(1) & later.any(1)
        assert not (remasked & (origin == 0))[rows].any(), f"step {i}: a sure step-0 token was remasked"
        checked += int(rows.sum())
        origin = torch.where(unmasked, i, origin)
    assert checked > 1000


def test_published_remdm_conf_remasks_each_token_with_softmax_of_negative_confidence_times_sigma_max():
    """Per-token rule: P(remask i) = softmax(-confidence)_i * sigma_max, with the unsure probability
    1/(V-1) = 0.25 (the mask is never a candidate, so it is not 1/V)."""
    steps = 6
    states, fixed = _run("remdm-conf", steps=steps, batch=4000, per_call=_sure_then_unsure, count="per-token")
    origin = torch.full(states[0].shape, -1)
    observed = expected = 0.0
    for i, (before, _, remasked, unmasked) in enumerate(_transitions(states)):
        eligible = (before != MASK) & ~fixed
        if i >= 2 and i < steps - 1:
            conf = torch.where(origin == 0, 1.0, 1.0 / (V - 1)).double()
            weights = (-conf).masked_fill(~eligible, float("-inf")).softmax(-1).nan_to_num(0.0)
            expected += (weights * sigma_max(i, steps))[origin > 0].sum().item()
            observed += (remasked & (origin > 0)).sum().item()
        if i == steps - 1:
            assert not remasked.any()  # never on the last step
        origin = torch.where(unmasked, i, origin)
    assert expected > 500
    assert abs(observed - expected) < 0.05 * expected, (observed, expected)


def test_binomial_count_is_binomial_in_clean_tokens_at_rate_min_eta_sigma_max():
    """The schedule's binomial count (ReMDM-cap with remdm): K ~ Bin(#clean, min(eta, sigma_max))."""
    n, length, steps, step = 20000, 100, 10, 5
    masked = torch.zeros(n, length, dtype=torch.bool)
    masked[:, 50:] = True
    plan = EvenSchedule("binomial", eta=0.3).plan(step, steps, masked, ~masked, torch.full((n,), length),
                                                  remasking=True, generator=torch.Generator().manual_seed(0))
    rate = min(0.3, sigma_max(step, steps))
    k = plan.remask_count.double()
    assert rate == 0.3 and plan.remask_rate is None
    assert abs(k.mean().item() - 50 * rate) < 0.1 and abs(k.var().item() - 50 * rate * (1 - rate)) < 0.5
    last = EvenSchedule("binomial", eta=0.3).plan(steps - 1, steps, masked, ~masked, torch.full((n,), length), True)
    assert (last.remask_count == 0).all()  # never on the last step
    assert sigma_max(0, steps) == 1.0 and sigma_max(steps - 1, steps) == 0.0 and sigma_max(8, 10) == pytest.approx(0.125)


def test_quality_is_read_from_the_current_tokens_not_a_stale_pass():
    """The scripted quality depends on the tokens it is shown; PRISM must remask the K lowest qualities of the
    state the step starts from (a sampler reusing the previous pass's quality would pick other tokens)."""

    class TokenQuality(ScriptedModel):
        def forward(self, tokens, need_logits=True, need_quality=True):
            out = super().forward(tokens, need_logits, need_quality)
            right = torch.roll(tokens, -1, dims=1)
            out.quality = (tokens + 0.3 * right + 0.001 * torch.arange(L)).float() if need_quality else None
            return out

    logits = torch.randn(L, V, generator=torch.Generator().manual_seed(4))
    model = TokenQuality(logits)
    states, fixed = _run("prism", k=2, steps=5, model=model, batch=256)
    checked = 0
    for before, after, remasked, _ in _transitions(states):
        eligible = (before != MASK) & ~fixed
        q = (before + 0.3 * torch.roll(before, -1, dims=1) + 0.001 * torch.arange(L)).float()
        for row in remasked.any(1).nonzero().flatten().tolist():
            want = set(q[row].masked_fill(~eligible[row], float("inf")).topk(2, largest=False).indices.tolist())
            assert set(remasked[row].nonzero().flatten().tolist()) == want
            checked += 1
    assert checked > 100


def test_confidence_order_unmasks_the_most_confident_positions_first():
    logits = torch.zeros(L, V)
    logits[:, 1] = torch.arange(L, dtype=torch.float)  # later positions are more confident
    states, _ = _run("none", steps=3, logits=logits, order="confidence", batch=4)
    first = (states[0] == MASK) & (states[1] != MASK)
    assert first[:, -3:].all() and not first[:, 3:-3].any()


def test_prism_policy_without_a_head_is_a_clear_error():
    with pytest.raises(ValueError, match="quality head"):
        _run("prism", quality=None)
