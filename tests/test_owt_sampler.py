"""OpenWebText samplers (Algorithm 2, PRISM-loop, ReMDM-loop) as schedules of the one sampler loop."""
import math

import pytest
import torch

from prism_ds.config import SamplerConfig
from prism_ds.core.remask import parse_row, parse_variant
from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import EvenSchedule, LoopSchedule, RemdmLoopSchedule, even_family_schedule, sigma_max
from prism_ds.models.prism_model import PrismOutput

MASK, V, L, N_FIXED = 0, 6, 40, 3


class RandomModel(torch.nn.Module):
    """Random logits and quality from its own seeded generator; records the batch it is shown each pass."""

    def __init__(self, seed: int = 0, quality=None):
        super().__init__()
        self.gen, self.quality, self.states = torch.Generator().manual_seed(seed), quality, []

    def forward(self, tokens, need_logits=True, need_quality=True):
        self.states.append(tokens.clone())
        logits = torch.randn(*tokens.shape, V, generator=self.gen)
        quality = None
        if need_quality:
            quality = (self.quality.expand(tokens.shape).clone() if self.quality is not None
                       else torch.rand(tokens.shape, generator=self.gen))
        return PrismOutput(logits=logits, quality=quality)


def _run(row: str, steps: int, batch: int = 64, seed: int = 0, model=None, **cfg_kw):
    """Sample a batch (first N_FIXED positions fixed) with a row; returns (history, model, fixed, schedule, out)."""
    cfg = SamplerConfig(**cfg_kw)
    policy, count, kind = parse_row(row, cfg.remask_count)
    schedule = even_family_schedule(kind, count, cfg, steps)
    tokens = torch.full((batch, L), MASK, dtype=torch.long)
    fixed = torch.zeros(batch, L, dtype=torch.bool)
    fixed[:, :N_FIXED], tokens[:, :N_FIXED] = True, torch.tensor([1, 2, 3])
    model = model or RandomModel(seed)
    record = SamplingRecord(keep_steps=True)
    out = sample(model, tokens, fixed, SamplerSettings(MASK, steps, schedule, policy=policy),
                 generator=torch.Generator().manual_seed(seed), record=record)
    return record.steps, model, fixed, schedule, out, tokens


def _before(history, start):
    """The state each step starts from: the initial tokens, then every step's result."""
    return [start] + [h[0] for h in history[:-1]]


OWT = dict(remask_count="binomial", eta_steps=2.56, remask_start=0.5)


@pytest.mark.parametrize("row", ["prism", "remdm", "prism/loop", "remdm-conf/loop"])
def test_nothing_is_remasked_before_l_on(row):
    steps = 16
    history, _, _, schedule, _, _ = _run(row, steps, batch=256, **OWT, eta_cap=False)
    n_gen = schedule.gen_steps if isinstance(schedule, LoopSchedule) else steps
    l_on = math.ceil(0.5 * n_gen)
    per_step = [int(h[1].sum()) for h in history]
    assert sum(per_step[:l_on]) == 0, per_step
    assert sum(per_step[l_on:n_gen]) > 0, per_step  # the rule does act after l_on (else this test proves nothing)


@pytest.mark.parametrize("cap", [True, False])
@pytest.mark.parametrize("kind", ["even", "loop", "remdm-loop"])
def test_remask_count_never_exceeds_the_clean_count(kind, cap):
    cfg = SamplerConfig(remask_count="binomial", eta=1.0, eta_cap=cap, loop_eta=1.0, loop_t_on=0.9)
    steps, n = 10, 500
    schedule = even_family_schedule(kind, "binomial", cfg, steps)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        masked = torch.rand(n, L, generator=g) < torch.rand(n, 1, generator=g)
        target = torch.full((n,), L)
        plan = schedule.plan(step, steps, masked, ~masked, target, remasking=True, generator=g)
        assert (plan.remask_count <= (~masked).sum(1)).all(), (kind, step)
        if plan.pre_remask is not None:
            assert (plan.pre_remask >= 0).all()


@pytest.mark.parametrize("row", ["none", "prism", "remdm:binomial", "remdm-conf:per-token", "prism:binomial/loop",
                                 "remdm/loop", "remdm/remdm-loop", "prism/remdm-loop", "remdm-conf/remdm-loop"])
@pytest.mark.parametrize("steps", [1, 3, 16])
def test_every_kind_is_complete_after_n_passes_and_keeps_fixed_tokens(row, steps):
    # eta rather than eta_steps: eta_steps / N_g > 1 at N_g = 1 is an error (tested below)
    history, model, fixed, _, out, start = _run(row, steps, batch=16, remask_count="binomial", eta=0.5,
                                                remask_start=0.5, loop_m=5, loop_eta=0.2)
    assert len(model.states) == len(history) == steps  # one pass per step, none skipped, none extra
    assert (out != MASK).all()
    assert torch.equal(out[fixed], start[fixed])
    for after, remasked, _ in history:
        assert not (remasked & fixed).any()


def test_loop_steps_remask_exactly_m_uniform_positions_before_the_pass_and_refill_them():
    steps, m, batch = 10, 4, 3000
    quality = torch.linspace(-3, 3, L)  # a strongly position-dependent quality: prism would never pick the right end
    model = RandomModel(quality=quality)
    history, model, fixed, schedule, _, start = _run("prism:binomial/loop", steps, batch=batch, model=model, **OWT,
                                                       loop_m=m)
    assert (schedule.gen_steps, schedule.loop_steps) == (5, 5)
    counts = torch.zeros(L)
    for step, (before, (after, remasked, unmasked)) in enumerate(zip(_before(history, start), history)):
        shown = model.states[step]
        if step < schedule.gen_steps:
            continue
        assert len(shown) == batch  # complete rows stay in the batch for the loop
        assert (before != MASK).all()  # the generation phase finished the sequence
        assert torch.equal(remasked.sum(1), torch.full((batch,), m))
        assert torch.equal((shown == MASK), remasked)  # remasked before the pass: the model sees the M masks
        assert torch.equal(unmasked, remasked) and (after != MASK).all()  # all refilled from that same pass
        counts += remasked.sum(0)
    assert counts[:N_FIXED].sum() == 0
    free = counts[N_FIXED:]
    expected = schedule.loop_steps * batch * m / (L - N_FIXED)
    assert free.min() > 0.85 * expected and free.max() < 1.15 * expected, free  # uniform, not by quality


def test_loop_generation_phase_is_an_ng_step_prism_run():
    """Algorithm 4 / D.2: eta and l_on of the generation phase are computed from N_g, not from N."""
    cfg = SamplerConfig(remask_count="binomial", eta_steps=2.56, remask_start=0.5, loop_fraction=0.5, loop_m=20)
    loop = even_family_schedule("loop", "binomial", cfg, 20)
    assert isinstance(loop, LoopSchedule) and (loop.gen_steps, loop.loop_steps, loop.loop_m) == (10, 10, 20)
    assert loop.inner.eta == pytest.approx(2.56 / 10) and loop.inner.start_step == 5 and loop.inner.cap
    even = even_family_schedule("even", "binomial", cfg, 20)
    assert even.eta == pytest.approx(2.56 / 20) and even.start_step == 10
    assert even_family_schedule("even", "binomial", SamplerConfig(remask_start=0.3), 10).start_step == 3
    assert even_family_schedule("loop", "fixed", SamplerConfig(loop_fraction=0.3), 7).gen_steps == 5  # 2.1 -> 2


@pytest.mark.parametrize("cap", [True, False])
def test_binomial_k_has_mean_sigma_times_clean(cap):
    """K ~ Bin(#clean, sigma), sigma = min(eta, sigma_max) with eta_cap, else eta (Algorithm 2 as printed)."""
    n, length, clean, steps, step = 4000, 1000, 300, 10, 8
    cfg = SamplerConfig(remask_count="binomial", eta_steps=5.0, eta_cap=cap)  # eta = 0.5 > sigma_max = 0.125
    schedule = even_family_schedule("even", "binomial", cfg, steps)
    masked = torch.ones(n, length, dtype=torch.bool)
    masked[:, :clean] = False
    plan = schedule.plan(step, steps, masked, ~masked, torch.full((n,), length), remasking=True,
                         generator=torch.Generator().manual_seed(0))
    sigma = min(0.5, sigma_max(step, steps)) if cap else 0.5
    assert sigma == pytest.approx(0.125 if cap else 0.5)
    k = plan.remask_count.double()
    assert abs(k.mean().item() - sigma * clean) < 0.02 * sigma * clean, (k.mean().item(), sigma * clean)
    assert abs(k.var().item() - clean * sigma * (1 - sigma)) < 0.1 * clean * sigma * (1 - sigma)


def test_sampler_remasks_the_planned_binomial_k_by_the_policy():
    """Through the sampler: the rows' remask counts average sigma * #clean over the active steps."""
    steps, batch = 8, 2000
    history, _, fixed, _, _, start = _run("remdm:binomial", steps, batch=batch, eta=0.1, eta_cap=False)
    observed = expected = 0.0
    for step, (before, (_, remasked, _)) in enumerate(zip(_before(history, start), history)):
        clean = ((before != MASK) & ~fixed).sum(1).double()
        if step == 4:  # 20 of 37 clean, K ~ Bin(20, 0.1) is always inside the active window K < 20 < 37 - K
            observed, expected = remasked.sum(1).double().mean().item(), (0.1 * clean).mean().item()
    assert expected > 1 and abs(observed - expected) < 0.1 * expected, (observed, expected)


def test_remdm_loop_holds_the_masked_count_in_the_loop_and_remasks_nothing_outside():
    steps, batch = 20, 500
    cfg = dict(loop_t_on=0.55, loop_t_off=0.05, loop_alpha_on=0.9, loop_eta=0.1)
    history, _, fixed, schedule, out, start = _run("remdm/remdm-loop", steps, batch=batch, **cfg)
    first, finish = schedule.phases(steps)
    assert (first, finish) == (9, 19)  # t_l = 1 - l/20: 0.55 at l = 9, 0.05 at l = 19
    target = L - N_FIXED
    in_loop = 0
    for step, (before, (after, remasked, unmasked)) in enumerate(zip(_before(history, start), history)):
        n_before, n_after = (before == MASK).sum(1), (after == MASK).sum(1)
        if step == first:
            assert ((before != MASK) & ~fixed).sum(1).eq(math.ceil(0.9 * target)).all()  # alpha_on reached
        if first <= step < finish:
            assert torch.equal(n_before, n_after)
            assert torch.equal(unmasked.sum(1), remasked.sum(1)) and not (remasked & unmasked).any()
            in_loop += int(remasked.sum())
        else:
            assert not remasked.any(), step
    assert in_loop > 0.5 * batch * (finish - first) * 0.1 * target * 0.9
    assert (out != MASK).all()


def test_remdm_loop_selects_by_the_rows_policy():
    """prism/remdm-loop remasks the K lowest-quality clean tokens in the loop."""
    quality = torch.randn(L, generator=torch.Generator().manual_seed(5))
    model = RandomModel(quality=quality)
    history, _, fixed, _, _, start = _run("prism/remdm-loop", 20, batch=200, model=model, loop_eta=0.1)
    checked = 0
    for before, (_, remasked, _) in zip(_before(history, start), history):
        eligible = (before != MASK) & ~fixed
        for row in remasked.any(1).nonzero().flatten().tolist():
            k = int(remasked[row].sum())
            want = quality.masked_fill(~eligible[row], float("inf")).topk(k, largest=False).indices
            assert set(remasked[row].nonzero().flatten().tolist()) == set(want.tolist())
            checked += 1
    assert checked > 100


def test_factory_even_matches_the_sudoku_schedule():
    """Default settings: the factory's even schedule is the EvenSchedule Sudoku used, bit for bit."""
    cfg = SamplerConfig(remask_count="binomial")
    built = even_family_schedule("even", "binomial", cfg, 6)
    assert (built.remask_count, built.remask_k, built.eta, built.start_step, built.cap) == ("binomial", 2, 0.2, 0, True)
    outs = []
    for schedule in (built, EvenSchedule(remask_count="binomial", remask_k=2, eta=0.2)):
        tokens = torch.full((32, L), MASK, dtype=torch.long)
        outs.append(sample(RandomModel(1), tokens, torch.zeros_like(tokens, dtype=torch.bool),
                           SamplerSettings(MASK, 6, schedule, policy="remdm"), generator=torch.Generator().manual_seed(2)))
    assert torch.equal(*outs)


@pytest.mark.parametrize("kind, settings, match", [
    ("even", dict(eta=0.0), "sampler.eta=0.0"),
    ("even", dict(eta=1.5), "sampler.eta=1.5"),
    ("even", dict(eta_steps=2.56), "sampler.eta_steps=2.56"),  # 2.56 / 2 > 1
    ("even", dict(eta_steps=-1.0), "sampler.eta_steps=-1.0"),
    ("even", dict(remask_start=1.5), "l_on > N"),
    ("loop", dict(remask_start=-0.1), "sampler.remask_start"),
    ("loop", dict(loop_m=0), "sampler.loop_m=0"),
    ("loop", dict(loop_fraction=0.0), "sampler.loop_fraction"),
    ("loop", dict(loop_fraction=1.0), "sampler.loop_fraction"),
    ("remdm-loop", dict(loop_t_on=0.05, loop_t_off=0.1), "sampler.loop_t_on"),
    ("remdm-loop", dict(loop_t_on=1.5), "sampler.loop_t_on"),
    ("remdm-loop", dict(loop_alpha_on=0.0), "sampler.loop_alpha_on"),
    ("remdm-loop", dict(loop_eta=0.0), "sampler.loop_eta"),
    ("cosine", dict(), "schedule 'cosine'"),
])
def test_bad_settings_are_errors_naming_the_setting(kind, settings, match):
    with pytest.raises(ValueError, match=match):
        even_family_schedule(kind, "binomial", SamplerConfig(remask_count="binomial", **settings), 2)


def test_row_grammar():
    assert parse_row("prism") == ("prism", "fixed", "even")
    assert parse_row("prism:binomial/loop") == ("prism", "binomial", "loop")
    assert parse_row("remdm/loop", "per-token") == ("remdm", "per-token", "loop")
    assert parse_row("remdm/remdm-loop") == ("remdm", "binomial", "remdm-loop")
    assert parse_variant("remdm:binomial") == ("remdm", "binomial")
    for bad, match in [("prism/cosine", "schedule 'cosine'"), ("prism/", "schedule ''"), ("none/loop", "'none'"),
                       ("remdm:fixed/remdm-loop", "remask count 'fixed'"), ("prismx/loop", "sampler.policy='prismx'"),
                       ("prism:poisson/loop", "remask count 'poisson'")]:
        with pytest.raises(ValueError, match=match):
            parse_row(bad)
    with pytest.raises(ValueError, match="no /schedule"):
        parse_variant("prism/loop")  # the blockwise samplers have their own schedule


def test_a_loop_schedule_built_for_n_refuses_another_n():
    schedule = even_family_schedule("loop", "fixed", SamplerConfig(), 10)
    masked = torch.ones(2, L, dtype=torch.bool)
    with pytest.raises(ValueError, match="N = 10"):
        schedule.plan(0, 12, masked, ~masked, torch.full((2,), L), True)
    assert isinstance(even_family_schedule("remdm-loop", "fixed", SamplerConfig(), 10), RemdmLoopSchedule)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_drawing_in_chunks_gives_the_same_samples(monkeypatch, top_p):
    """The float64 draw runs over fillable positions in chunks (memory at large vocabularies): same tokens."""
    import prism_ds.core.sampler as sampler_mod

    whole = _run("prism:binomial/loop", 12, batch=16, **OWT, top_p=top_p)[4]
    monkeypatch.setattr(sampler_mod, "_DRAW_CHUNK", 7)
    chunked = _run("prism:binomial/loop", 12, batch=16, **OWT, top_p=top_p)[4]
    assert torch.equal(whole, chunked)
    monkeypatch.setattr(sampler_mod, "_DRAW_CHUNK", 1 << 20)
    assert not torch.equal(whole, _run("prism:binomial/loop", 12, batch=16, seed=1, **OWT, top_p=top_p)[4])


def test_the_quality_head_runs_only_on_steps_that_may_remask():
    """Before l_on and in loop steps nothing is remasked, so the head (a DiT block for OWT) is not evaluated."""

    class Counting(RandomModel):
        def forward(self, tokens, need_logits=True, need_quality=True):
            self.asked = getattr(self, "asked", []) + [need_quality]
            return super().forward(tokens, need_logits, need_quality)

    model = Counting(0)
    history, _, _, schedule, _, _ = _run("prism:binomial/loop", 16, model=model, **OWT)
    n_gen = schedule.gen_steps
    assert not any(model.asked[:math.ceil(0.5 * n_gen)]) and not any(model.asked[n_gen:])
    assert any(model.asked[math.ceil(0.5 * n_gen):n_gen])


def _remdm_transition(sampler: str, alpha_t: float, alpha_s: float, eta: float) -> tuple[float, float]:
    """ReMDM's `_ddpm_caching_update` (and MDLM's) per-position rule, re-implemented plainly: (expected tokens
    remasked per clean token (cap) or per row (conf: the softmax weights sum to one), P(a masked token stays
    masked))."""
    smax = min(1.0, (1 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
    if sampler == "mdlm":
        return 0.0, (1 - alpha_s) / (1 - alpha_t)
    if sampler == "remdm-cap":
        sigma = min(eta, smax) if alpha_t > 0 else eta
        return sigma, (1 - alpha_s - sigma * alpha_t) / (1 - alpha_t)
    return smax, (1 - alpha_s) / (1 - alpha_t)  # remdm-conf: sigma_i = softmax(-conf)_i * sigma_max, 0 on masks


@pytest.mark.parametrize("row,sampler", [("none/ancestral", "mdlm"), ("remdm:binomial/ancestral", "remdm-cap"),
                                         ("remdm-conf:per-token/ancestral", "remdm-conf")])
def test_ancestral_rows_take_mdlm_and_remdm_transition_probabilities(row, sampler):
    steps, eta = 5, 0.3
    history, _, fixed, _, out, start = _run(row, steps, batch=3000, eta=eta)
    assert len(history) == steps and (out != MASK).all() and torch.equal(out[:, :N_FIXED], start[:, :N_FIXED])
    for step, (before, (after, remasked, _)) in enumerate(zip(_before(history, start), history)):
        remask, stay = _remdm_transition(sampler, step / steps, (step + 1) / steps, eta)
        was_masked, was_clean = (before == MASK) & ~fixed, (before != MASK) & ~fixed
        assert abs(((after == MASK) & was_masked).sum() / was_masked.sum() - stay) < 0.01, step
        if sampler == "remdm-cap" and was_clean.any():
            assert abs(remasked.sum() / was_clean.sum() - remask) < 0.01, step
        if sampler == "remdm-conf" and was_clean.any():
            assert abs(remasked.sum(1).double().mean() - remask) < 0.05, step
        if sampler == "mdlm":
            assert not remasked.any()


def test_ancestral_needs_a_rate_count():
    assert parse_row("none/ancestral") == ("none", "fixed", "ancestral")
    with pytest.raises(ValueError, match="ancestral sampling remasks by a rate"):
        parse_row("remdm/ancestral")


def test_nucleus_drops_the_token_that_crosses_p():
    """ReMDM and the authors keep a token while the cumulative probability is <= p, and the argmax always."""
    from prism_ds.core.sampling_utils import nucleus_filter, sample_tokens

    logits = torch.tensor([[0.85, 0.10, 0.05], [0.5, 0.3, 0.2], [0.95, 0.03, 0.02]]).log()
    kept = nucleus_filter(logits, 0.9).isfinite()
    assert kept.tolist() == [[True, False, False], [True, True, False], [True, False, False]]
    assert nucleus_filter(logits, 0.0).isfinite().sum(1).tolist() == [1, 1, 1]
    # ReMDM-conf stores the probability under the renormalised nucleus: 0.3 / 0.8 for the second row's token 1.
    draw = sample_tokens(logits[1:2].repeat(4000, 1), top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert set(draw.tokens.tolist()) == {0, 1}
    assert torch.allclose(draw.drawn_prob[draw.tokens == 1], torch.tensor(0.3 / 0.8, dtype=torch.float64))
    assert torch.allclose(draw.prob[draw.tokens == 1], torch.tensor(0.3, dtype=torch.float64))
