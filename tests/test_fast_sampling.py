"""KV-cached blockwise sampling (prefix and dual cache) and confidence-threshold decoding, with PRISM remasking."""
import warnings

import pytest
import torch

from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import BlockwiseSchedule
from prism_ds.models.backbone import HFBackbone
from prism_ds.models.llada import LLaDAConfig, LLaDAModelLM
from prism_ds.models.prism_model import PrismModel
from prism_ds.models.quality_heads import build_quality_head

MASK, V, PROMPT, GEN, BLOCK = 60, 64, 6, 16, 8


def _model(seed=0, sharp=0.0):
    torch.manual_seed(seed)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=V, embedding_size=V,
                      mask_token_id=MASK)
    base = LLaDAModelLM(cfg).eval()
    if sharp:  # a confident model: large output weights make most proposals exceed a threshold
        with torch.no_grad():
            base.model.transformer.ff_out.weight.mul_(sharp)
    head = build_quality_head("projection+linear", 32, None)
    with torch.no_grad():
        head.net[-1].weight.normal_()  # a non-constant quality, so the remask choice depends on it
    return PrismModel(HFBackbone(base), head).eval()


def _canvas(batch=6):
    tokens = torch.full((batch, PROMPT + GEN), MASK)
    tokens[:, :PROMPT] = torch.randint(0, 50, (batch, PROMPT), generator=torch.Generator().manual_seed(2))
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, :PROMPT] = True
    return tokens, fixed


def _settings(steps=8, k_block=2, **kw):
    return SamplerSettings(MASK, steps, BlockwiseSchedule(BLOCK, k_block, gen_length=GEN), **kw)


def _sample(model, policy="prism", steps=8, k_block=2, **extras):
    tokens, fixed = _canvas()
    ex = SamplingRecord(keep_steps=True)
    settings = _settings(steps, k_block, policy=policy, unmask_order="confidence", temperature=0.0, **extras)
    out = sample(model, tokens, fixed, settings, generator=torch.Generator().manual_seed(0), record=ex)
    return tokens, out, ex


def test_cache_off_is_the_blockwise_sampler_bit_for_bit():
    model = _model()
    _, plain, _ = _sample(model)
    tokens, fixed = _canvas()
    default = sample(model, tokens, fixed, _settings(policy="prism", unmask_order="confidence", temperature=0.0),
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, default)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_passes_compute_what_the_plan_says(mode):
    model = _model()
    start, out, ex = _sample(model, cache=mode)
    length = PROMPT + GEN
    per_block = 4  # 8 steps over 2 blocks
    assert len(ex.passes) == 8  # one pass per step
    for step, (rows, computed) in enumerate(ex.passes):
        lo = PROMPT + (step // per_block) * BLOCK
        if step % per_block == 0:
            assert computed == (0, length)  # a block starts with a full pass that refills the cache
        else:
            assert computed == ((lo, length) if mode == "prefix" else (lo, lo + BLOCK))
        assert rows == 6
    # The prompt and finished blocks never change; exactly K_block remasks per block.
    before, per_block_remasks = start, torch.zeros(6, 2, dtype=torch.long)
    for step, (after, remasked, _) in enumerate(ex.steps):
        lo = PROMPT + (step // per_block) * BLOCK
        assert torch.equal(after[:, :lo], before[:, :lo])
        per_block_remasks[:, step // per_block] += remasked.sum(1)
        before = after
    assert (per_block_remasks == 2).all() and (out != MASK).all()


def test_a_blocks_first_cached_step_gives_exactly_the_uncached_logits_and_later_steps_approximate_them():
    model, seen = _model(), []
    backbone = model.backbone.model

    class Compare(torch.nn.Module):  # every cached pass is also run uncached, on the same state
        supports_kv_cache = True

        def forward(self, tokens, **kw):
            out = model(tokens, **kw)
            if "fill_cache" in kw or "fresh" in kw:
                ref = model(tokens, need_logits=True, need_quality=False, logits_cols=kw["logits_cols"])
                seen.append(("fresh" in kw, (out.logits - ref.logits).abs().mean().item()))
            return out

    _sample(Compare(), cache="prefix")
    full = [d for cached, d in seen if not cached]
    partial = [d for cached, d in seen if cached]
    assert full and all(d == 0 for d in full)  # the refill pass is the uncached pass
    assert partial and 0 < sum(partial) / len(partial) < 0.5  # stale prefix keys: a small approximation
    assert backbone is model.backbone.model


def test_cached_sampling_mostly_agrees_with_uncached_sampling():
    model = _model()
    _, plain, _ = _sample(model, policy="none")
    gen = slice(PROMPT, None)
    for mode in ("prefix", "dual"):
        _, cached, _ = _sample(model, policy="none", cache=mode)
        agree = (cached[:, gen] == plain[:, gen]).float().mean().item()
        assert agree > 0.5, (mode, agree)


def test_threshold_decoding_unmasks_every_confident_token_and_keeps_k_block_remasks():
    model = _model(sharp=100.0)
    start, out, ex = _sample(model, steps=16, k_block=2, threshold=0.6, cache="dual")
    assert (out != MASK).all()
    assert len(ex.passes) < 16  # blocks filled early skip their idle steps
    per_block = torch.zeros(6, 2, dtype=torch.long)
    for _, remasked, _ in ex.steps:
        rows, pos = remasked.nonzero(as_tuple=True)
        per_block.index_put_((rows, (pos - PROMPT) // BLOCK), torch.ones_like(rows), accumulate=True)
    assert (per_block == 2).all()  # K_block remasks in every block, as without a threshold
    # A threshold step unmasked every masked token of its block that was above it (at least one).
    assert max(u.sum(1).max().item() for _, _, u in ex.steps) > 1


def test_threshold_one_still_fills_each_block_and_bad_settings_are_named():
    model = _model()
    _, out, _ = _sample(model, steps=16, threshold=1.0)  # nothing exceeds 1: one token per step, all on close
    assert (out != MASK).all()
    with pytest.raises(ValueError, match=r"sampler.threshold=1.5 must be in \(0, 1\]"):
        _sample(model, threshold=1.5)
    with pytest.raises(ValueError, match="sampler.cache='triple'"):
        _sample(model, cache="triple")


def test_a_model_without_cache_support_warns_and_samples_uncached():
    model = _model()

    class NoCache(torch.nn.Module):
        def forward(self, tokens, **kw):
            return model(tokens, **kw)

    with pytest.warns(UserWarning, match="no KV cache support"):
        _, cached, _ = _sample(NoCache(), cache="dual")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, plain, _ = _sample(NoCache())
    assert torch.equal(cached, plain)


def _padded(pad):
    """Two prompts, the second left-padded by `pad`: (tokens, fixed, attention_mask)."""
    tokens, fixed = _canvas(2)
    tokens[1, :pad] = 0
    am = torch.ones_like(tokens)
    am[1, :pad] = 0
    return tokens, fixed, am


@pytest.mark.parametrize("threshold", [None, 0.6])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("policy", ["none", "prism", "remdm", "remdm-conf"])
def test_every_policy_runs_cached_with_padded_prompts_and_eos_stop(policy, cache, threshold):
    model, pad = _model(sharp=100.0 if threshold else 0.0), 3
    run = lambda tokens, fixed, prompt, attention_mask, **ex: sample(  # noqa: E731
        model, tokens, fixed, _settings(policy=policy, unmask_order="confidence", temperature=0.0, cache=cache,
                                        threshold=threshold, **ex),
        attention_mask=attention_mask, generator=torch.Generator().manual_seed(0))
    tokens, fixed, am = _padded(pad)
    free = run(tokens, fixed, PROMPT, attention_mask=am)
    eos = int(free[:, PROMPT:].flatten().mode().values)  # a token the model does produce, so rows do stop
    out = run(tokens, fixed, PROMPT, attention_mask=am, eos_id=eos, stop_at_eos=True)
    assert torch.equal(out[:, :PROMPT], tokens[:, :PROMPT]) and (out != MASK).all()
    for row in out[:, PROMPT:]:
        hits = (row == eos).nonzero().flatten()
        if len(hits):  # everything after the block holding the first EOS is EOS
            assert (row[(int(hits[0]) // BLOCK + 1) * BLOCK:] == eos).all()
    if policy in ("none", "prism"):  # deterministic: the padded row is the same prompt sampled alone
        alone = run(tokens[1:, pad:], fixed[1:, pad:], PROMPT - pad, attention_mask=None)
        assert torch.equal(free[1, pad:], alone[0])


@pytest.mark.parametrize("hi", [PROMPT + BLOCK, PROMPT + GEN])  # dual: the block; prefix: block and suffix
def test_a_cached_pass_with_one_layer_is_exact_after_the_slice_changes(hi):
    # With one layer, a position's keys and values depend on its own token only: a pass that recomputes
    # the changed slice and reads the rest from the cache must equal a full pass on the new tokens.
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=64, vocab_size=V, embedding_size=V,
                      mask_token_id=MASK)
    model = LLaDAModelLM(cfg).eval()
    before, _ = _canvas(2)
    after = before.clone()
    after[:, PROMPT:PROMPT + 4] = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(before, fill_cache=True).kv_cache
        cols = torch.arange(PROMPT, PROMPT + BLOCK)
        cached = model(after, kv_cache=cache, fresh=(PROMPT, hi), logits_cols=cols).logits
        full = model(after, logits_cols=cols).logits
    assert torch.allclose(cached, full, atol=1e-5)
    assert not torch.allclose(model(before, logits_cols=cols).logits, full, atol=1e-3)  # the change matters


def _fast_dllm_threshold(model, prompt: torch.Tensor, gen_length: int, block: int, threshold: float):
    """Fast-dLLM's `generate(..., threshold=tau)` rule, re-implemented plainly (uncached, argmax): per block, passes
    until the block is full; each pass keeps the most confident masked token of the block and every other one
    whose confidence is >= tau. The mask token is left out of the argmax and the softmax, as in prism-ds."""
    x = torch.cat([prompt, torch.full((len(prompt), gen_length), MASK)], 1)
    passes = 0
    for lo in range(prompt.shape[1], x.shape[1], block):
        while (x[:, lo:lo + block] == MASK).any():
            logits = model(x, need_logits=True, need_quality=False).logits.double()
            logits[..., MASK] = float("-inf")
            probs = logits.softmax(-1)
            conf, x0 = probs.max(-1)
            masked = torch.zeros_like(x, dtype=torch.bool)
            masked[:, lo:lo + block] = x[:, lo:lo + block] == MASK
            conf = conf.masked_fill(~masked, -1.0)
            top = conf.argmax(1)
            take = masked & (conf >= threshold)
            take[torch.arange(len(x)), top] |= masked[torch.arange(len(x)), top]
            x = torch.where(take, x0, x)
            passes += 1
    return x, passes


@pytest.mark.parametrize("steps", [2, 4, 16])
def test_threshold_ignoring_the_step_count_is_fast_dllms_rule_token_for_token(steps):
    model = _model(sharp=30.0)
    tokens, fixed = _canvas()
    reference, passes = _fast_dllm_threshold(model, tokens[:, :PROMPT], GEN, BLOCK, 0.9)
    ex = SamplingRecord()
    out = sample(model, tokens, fixed, _settings(steps, 0, unmask_order="confidence", temperature=0.0, threshold=0.9,
                                                 threshold_steps="ignore"), record=ex)
    assert torch.equal(out, reference)
    # Each row advances through its own blocks: the batch takes as many passes as its slowest row alone.
    alone = [_fast_dllm_threshold(model, tokens[r:r + 1, :PROMPT], GEN, BLOCK, 0.9)[1] for r in range(len(tokens))]
    assert len(ex.passes) == max(alone) <= passes
    # "cap": a block's planned steps are the most it gets, its last one filling what is left.
    capped = SamplingRecord()
    sample(model, tokens, fixed, _settings(steps, 0, unmask_order="confidence", temperature=0.0, threshold=0.9,
                                           threshold_steps="cap"), record=capped)
    assert len(capped.passes) <= min(steps, passes)
    if steps == 2:  # one planned step per block: each block in a single pass
        assert len(capped.passes) == 2 < passes


def test_threshold_steps_is_checked():
    with pytest.raises(ValueError, match="sampler.threshold_steps='sometimes'"):
        _sample(_model(), threshold=0.5, threshold_steps="sometimes")


@pytest.mark.parametrize("steps", [2, 4])  # 1 and 2 planned steps per block
def test_ignoring_the_step_count_still_gives_every_block_its_k_block_remasks(steps):
    model = _model(sharp=100.0)  # confident: a block can fill in its first pass
    _, out, ex = _sample(model, steps=steps, k_block=2, threshold=0.5, threshold_steps="ignore")
    assert (out != MASK).all()
    per_block = torch.zeros(6, 2, dtype=torch.long)
    for _, remasked, _ in ex.steps:
        rows, pos = remasked.nonzero(as_tuple=True)
        per_block.index_put_((rows, (pos - PROMPT) // BLOCK), torch.ones_like(rows), accumulate=True)
    assert (per_block == 2).all()


def test_capped_threshold_steps_need_a_step_to_refill_the_remask_round():
    model = _model(sharp=100.0)
    with pytest.raises(ValueError, match="k_block=2 needs at least 3 steps per block"):
        _sample(model, steps=4, k_block=2, threshold=0.5, threshold_steps="cap")  # 2 per block
    _, out, _ = _sample(model, steps=6, k_block=2, threshold=0.5, threshold_steps="cap")
    assert (out != MASK).all()


def test_threshold_decoding_selects_by_confidence_whatever_the_unmask_order():
    model = _model(sharp=30.0)
    tokens, fixed = _canvas()
    runs = [sample(model, tokens, fixed, _settings(4, 0, unmask_order=order, temperature=0.0, threshold=0.9),
                   generator=torch.Generator().manual_seed(0)) for order in ("confidence", "random")]
    assert torch.equal(runs[0], runs[1])
