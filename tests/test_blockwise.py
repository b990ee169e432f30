"""The blockwise semi-autoregressive schedule in the one sampler loop, with scripted models."""
import pytest
import torch

from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import BlockwiseSchedule
from prism_ds.core.schedules.blockwise import remask_steps
from prism_ds.models.prism_model import PrismOutput

MASK, EOS, V = 0, 9, 12
PROMPT, GEN, BLOCK = 5, 12, 4


class Recorder(torch.nn.Module):
    """Random logits, quality from the tokens it is shown; records each call's inputs."""

    def __init__(self, eos_bias: float = 0.0, seed: int = 0):
        super().__init__()
        self.calls, self.masks, self.eos_bias = [], [], eos_bias
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, tokens, need_logits=True, need_quality=True, attention_mask=None, logits_cols=None):
        self.calls.append(tokens.clone())
        self.masks.append(attention_mask)
        self.cols = getattr(self, "cols", []) + [logits_cols]
        logits = torch.randn(*tokens.shape, V, generator=self.gen)
        logits = logits if logits_cols is None else logits[:, logits_cols]
        logits[..., EOS] += self.eos_bias
        quality = (tokens.float() * 0.37 + torch.arange(tokens.shape[1]) * 0.01).sin() if need_quality else None
        return PrismOutput(logits=logits, quality=quality)


def _canvas(batch=32):
    tokens = torch.full((batch, PROMPT + GEN), MASK)
    tokens[:, :PROMPT] = torch.randint(1, 8, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, :PROMPT] = True
    return tokens, fixed


def _run(policy="prism", steps=12, k_block=2, batch=32, extras=None, model=None, order="confidence", temperature=0.0):
    tokens, fixed = _canvas(batch)
    model, record = model or Recorder(), SamplingRecord(keep_steps=True)
    settings = SamplerSettings(MASK, steps, BlockwiseSchedule(BLOCK, k_block, gen_length=GEN), policy=policy,
                               unmask_order=order, temperature=temperature, **(extras or {}))
    out = sample(model, tokens, fixed, settings, generator=torch.Generator().manual_seed(0), record=record)
    return tokens, out, model, record.steps


def test_remask_steps_go_to_the_middle_of_the_block():
    assert remask_steps(4, 8) == [0, 0, 1, 1, 1, 1, 0, 0]
    assert remask_steps(6, 8) == [0, 1, 1, 1, 1, 1, 1, 0]
    assert remask_steps(9, 4) == [0, 5, 4, 0]
    assert remask_steps(3, 2) == [0, 0]  # a 2-step block has no inner step
    assert sum(remask_steps(16, 16)) == 16


@pytest.mark.parametrize("policy", ["none", "prism", "remdm", "remdm-conf"])
def test_blocks_fill_left_to_right_and_nothing_outside_the_current_block_changes(policy):
    start, out, model, history = _run(policy)
    assert len(model.calls) == 12  # forward passes == steps
    # The model projects to the vocabulary only the current block's positions.
    assert [c.tolist() for c in model.cols] == [list(range(PROMPT + 4 * (i // 4), PROMPT + 4 * (i // 4) + 4))
                                                for i in range(12)]
    assert (out != MASK).all() and torch.equal(out[:, :PROMPT], start[:, :PROMPT])  # the prompt never changes
    before = start
    for step, (after, remasked, unmasked) in enumerate(history):
        block = step // 4  # 12 steps over 3 blocks of 4 positions
        lo, hi = PROMPT + block * BLOCK, PROMPT + (block + 1) * BLOCK
        changed = before != after
        assert not changed[:, :lo].any() and not changed[:, hi:].any(), step
        assert not (remasked & unmasked).any()  # a token remasked in a step is not refilled in it
        if step % 4 == 3:  # the block's last step fills it
            assert (after[:, lo:hi] != MASK).all()
        before = after


def test_exactly_k_block_remasks_per_block_and_unmask_counts_are_base_plus_remasked():
    _, _, _, history = _run("remdm", steps=24, k_block=3)  # 8 steps per block
    per_block = torch.zeros(32, 3, dtype=torch.long)
    for step, (_, remasked, unmasked) in enumerate(history):
        per_block[:, step // 8] += remasked.sum(1)
        if step % 8 == 0:  # LLaDA's even split of 4 masks over 8 steps: 1,1,1,1,0,0,0,0 (remainder first)
            assert (unmasked.sum(1) == 1).all()
    assert (per_block == 3).all()


def test_remdm_conf_without_a_head_and_prism_with_stale_free_quality():
    tokens, out, model, history = _run("remdm-conf", k_block=2)
    assert (out != MASK).all()
    _, _, model, history = _run("prism", steps=24, k_block=2)
    before = _canvas()[0]
    for call, (after, remasked, _) in zip(model.calls, history):
        assert torch.equal(call, before)  # the pass sees the state the step starts from
        q = (before.float() * 0.37 + torch.arange(before.shape[1]) * 0.01).sin()
        eligible = (before != MASK) & ~(torch.arange(before.shape[1]) < PROMPT)
        for row in remasked.any(1).nonzero().flatten()[:5].tolist():
            window = remasked[row].nonzero().flatten()
            lo = PROMPT + (window.min().item() - PROMPT) // BLOCK * BLOCK
            cand = q[row].masked_fill(~eligible[row] | (torch.arange(len(q[row])) < lo) |
                                      (torch.arange(len(q[row])) >= lo + BLOCK), float("inf"))
            assert set(window.tolist()) == set(cand.topk(len(window), largest=False).indices.tolist())
        before = after


def test_stop_at_eos_fills_the_rest_with_eos_and_drops_the_row_from_later_passes():
    extras = dict(eos_id=EOS, stop_at_eos=True)
    _, out, model, _ = _run("none", extras=extras, model=Recorder(eos_bias=2.5))
    sizes = [len(c) for c in model.calls]
    assert sizes[0] == 32 and sum(sizes) < 32 * 12  # stopped rows left the batch (all of them, here, after block 0)
    for row in out:
        gen = row[PROMPT:]
        first = (gen == EOS).nonzero()
        if len(first):
            block_end = (first[0].item() // BLOCK + 1) * BLOCK
            assert (gen[block_end:] == EOS).all()
    baseline = _run("none", extras={}, model=Recorder(eos_bias=2.5))[2]
    assert len(baseline.calls) == 12 and all(len(c) == 32 for c in baseline.calls)


def test_padding_mask_reaches_the_model_and_cfg_adds_an_unconditional_pass():
    tokens, fixed = _canvas(4)
    am = torch.ones_like(tokens)
    am[:2, :2] = 0  # two left-padded rows
    model = Recorder()
    settings = SamplerSettings(MASK, 6, BlockwiseSchedule(BLOCK, gen_length=GEN), cfg_scale=1.5)
    sample(model, tokens, fixed, settings, attention_mask=am, cfg_mask=fixed, generator=torch.Generator().manual_seed(0))
    assert all(len(c) == 8 for c in model.calls)  # conditional + unconditional rows in one pass
    assert (model.calls[0][4:, :PROMPT] == MASK).all()  # the prompt is masked for the unconditional half
    assert torch.equal(model.masks[0], torch.cat([am, am]))


def test_bad_blockwise_settings_are_named():
    with pytest.raises(ValueError, match="block_length=5 must divide sampler.gen_length=12"):
        BlockwiseSchedule(5, gen_length=GEN)
    with pytest.raises(ValueError, match="steps=10 must be a multiple of the number of blocks"):
        _run("none", steps=10)
    with pytest.raises(ValueError, match="remask_count='binomial' is only for the even schedule"):
        BlockwiseSchedule(BLOCK, 2, gen_length=GEN, remask_count="binomial")
