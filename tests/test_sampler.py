"""Sampler properties on tiny sequences with a scripted model that records every state it is shown."""
import pytest
import torch

from prism_ds.core.sampler import sample
from prism_ds.core.schedules import FixedKSchedule
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


def _run(policy, k=2, steps=5, quality=None, logits=None, per_call=None, order="random", seed=0, batch=64):
    tokens, fixed = _start(batch)
    logits = torch.randn(L, V, generator=torch.Generator().manual_seed(9)) if logits is None else logits
    model = ScriptedModel(logits, quality, per_call)
    out = sample(model, tokens, fixed, MASK, steps, FixedKSchedule(remask_k=k), policy=policy, unmask_order=order,
                 generator=torch.Generator().manual_seed(seed))
    return model.states + [out], fixed


def _transitions(states):
    for before, after in zip(states[:-1], states[1:]):
        yield before, after, (before != MASK) & (after == MASK), (before == MASK) & (after != MASK)


@pytest.mark.parametrize("policy", ["none", "prism", "remdm", "remdm-conf"])
def test_every_policy_keeps_fixed_tokens_and_finishes_in_n_steps(policy):
    quality = torch.randn(L)
    states, fixed = _run(policy, quality=quality)
    assert len(states) == 6  # 5 forward passes, then the result
    for s in states:
        assert torch.equal(s[fixed], states[0][fixed])
    assert (states[-1] != MASK).all()
    # Remasking never outpaces unmasking: the number of masks strictly falls every step.
    masked_counts = torch.stack([(s == MASK).sum(1) for s in states])
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


def test_remdm_conf_uses_the_probability_at_unmask_time_not_the_current_one():
    """Step 0 is sure of every token (p ~ 1), later steps are unsure of all (p = 0.2). ReMDM-conf samples
    the remasked token with probability proportional to exp(-confidence at unmask time), so tokens from
    step 0 are ~e^0.8 times less likely per token; the authors' code, which overwrote confidences
    every step, would treat all tokens alike."""
    sure, unsure = torch.full((V,), -10.0), torch.zeros(V)
    sure[1] = 10.0
    states, fixed = _run("remdm-conf", k=1, steps=6, batch=4000,
                         per_call=lambda i: (sure if i == 0 else unsure).expand(L, V))
    origin = torch.full(states[0].shape, -1)
    observed = expect_remembered = expect_overwritten = 0.0
    for i, (before, _, remasked, unmasked) in enumerate(_transitions(states)):
        eligible = (before != MASK) & ~fixed
        n0 = (eligible & (origin == 0)).sum(1).double()
        n1 = (eligible & (origin > 0)).sum(1).double()
        event = remasked.any(1)
        if i >= 2 and event.any():
            observed += (remasked & (origin == 0)).sum().item()
            w0, w1 = n0 * torch.exp(torch.tensor(-1.0)), n1 * torch.exp(torch.tensor(-0.2))
            expect_remembered += (w0 / (w0 + w1))[event].sum().item()
            expect_overwritten += (n0 / (n0 + n1))[event].sum().item()
        origin = torch.where(unmasked, i, origin)
    assert expect_overwritten > 1.3 * expect_remembered  # the two hypotheses are distinguishable here
    assert abs(observed - expect_remembered) < 0.1 * expect_remembered


def test_confidence_order_unmasks_the_most_confident_positions_first():
    logits = torch.zeros(L, V)
    logits[:, 1] = torch.arange(L, dtype=torch.float)  # later positions are more confident
    states, _ = _run("none", steps=3, logits=logits, order="confidence", batch=4)
    first = (states[0] == MASK) & (states[1] != MASK)
    assert first[:, -3:].all() and not first[:, 3:-3].any()


def test_prism_policy_without_a_head_is_a_clear_error():
    with pytest.raises(ValueError, match="quality head"):
        _run("prism", quality=None)
