"""Masking process, y-construction, the two loss terms and the two-pass training step."""
import math

import pytest
import torch
import torch.nn.functional as F

from prism_ds.config import MaskingConfig, ModelConfig, PrismConfig, QualityHeadConfig
from prism_ds.core.loss import mdm_loss, prism_loss
from prism_ds.core.masking import mask_tokens, sample_times
from prism_ds.core.objective import compute_losses
from prism_ds.core.sampling_utils import nucleus_filter
from prism_ds.core.y_construction import build_y
from prism_ds.models.prism_model import build_model

MASK = 0


def test_mask_rate_follows_t_and_fixed_positions_are_never_masked():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 5, (4000, 32), generator=gen)
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, :8] = True
    mb = mask_tokens(x, fixed, MASK, eps=1e-3, generator=gen)
    assert not mb.masked[:, :8].any()
    assert torch.equal(mb.z[~mb.masked], x[~mb.masked]) and (mb.z[mb.masked] == MASK).all()
    assert (mb.t >= 1e-3).all() and (mb.t <= 1).all()
    # Per-sample mask fraction over free positions tracks (1 - eps) t.
    frac = mb.masked[:, 8:].float().mean(1)
    assert (frac - (1 - 1e-3) * mb.t).abs().mean() < 0.08
    assert abs(mb.masked[:, 8:].float().mean().item() - 0.5) < 0.02  # E[t] = 1/2


def test_antithetic_times_are_evenly_spread():
    t = sample_times(8, eps=0.0, antithetic=True, generator=torch.Generator().manual_seed(1)).sort().values
    gaps = t.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-6)


def _y_setup(batch=64, length=20, vocab=6):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, vocab, (batch, length), generator=gen)
    mb = mask_tokens(x, torch.zeros_like(x, dtype=torch.bool), MASK, generator=gen)
    logits = torch.randn(batch, length, vocab, generator=gen, requires_grad=True)
    return x, mb, logits, gen


def test_y_fills_exactly_k_masked_positions_per_subset():
    x, mb, logits, gen = _y_setup()
    yb = build_y(x, mb.z, mb.masked, logits, k=3, n_y=4, generator=gen)
    assert yb.y.shape == (64 * 4, 20)
    masked = mb.masked.repeat_interleave(4, 0)
    assert (yb.chosen <= masked).all()  # only masked positions are filled
    assert torch.equal(yb.chosen.sum(1), masked.sum(1).clamp_max(3))  # k, or all when fewer are masked
    z = mb.z.repeat_interleave(4, 0)
    assert torch.equal(yb.y[~yb.chosen], z[~yb.chosen])  # everything else is z
    assert torch.equal(yb.label[yb.chosen], (yb.y == x.repeat_interleave(4, 0))[yb.chosen].float())
    # The n_y subsets of one z differ.
    subsets = yb.chosen.view(64, 4, 20)
    rows = mb.masked.sum(1) >= 6
    assert (subsets[rows, 0] != subsets[rows, 1]).any(-1).float().mean() > 0.8


def test_confidence_positions_pick_most_confident_and_argmax_fill():
    x, mb, logits, gen = _y_setup()
    yb = build_y(x, mb.z, mb.masked, logits, k=2, positions="confidence", temperature=0.0, generator=gen)
    conf = logits.detach().softmax(-1).amax(-1).masked_fill(~mb.masked, -1)
    for row in range(8):
        if mb.masked[row].sum() >= 2:
            assert set(yb.chosen[row].nonzero().flatten().tolist()) == set(conf[row].topk(2).indices.tolist())
    assert torch.equal(yb.y[yb.chosen], logits.detach().argmax(-1)[yb.chosen])


def test_confidence_positions_with_several_subsets_give_different_subsets_favouring_confident_positions():
    x, mb, logits, gen = _y_setup(batch=256)
    yb = build_y(x, mb.z, mb.masked, logits, k=2, n_y=4, positions="confidence", generator=gen)
    subsets = yb.chosen.view(256, 4, 20)
    rows = mb.masked.sum(1) >= 6
    assert (subsets[rows, 0] != subsets[rows, 1]).any(-1).float().mean() > 0.5  # not n_y copies of one subset
    assert torch.equal(subsets.sum(-1), mb.masked.sum(1, keepdim=True).clamp_max(2).expand(-1, 4))
    conf = logits.detach().softmax(-1).amax(-1).masked_fill(~mb.masked, float("nan"))
    picked = conf.repeat_interleave(4, 0)[yb.chosen].mean()
    assert picked > conf.nanmean() + 0.02  # weighted towards confident positions


def test_y_holds_only_allowed_tokens():
    x, mb, logits, gen = _y_setup()
    allowed = torch.tensor([False, True, True, False, True, False])  # e.g. digits only, no separator
    peaked = logits.detach().clone()
    peaked[..., 3] = 50.0  # the model's favourite token is not allowed
    for temperature in (0.0, 1.0):
        for positions in ("random", "confidence"):
            yb = build_y(x, mb.z, mb.masked, peaked, k=3, positions=positions, temperature=temperature,
                         generator=gen, mask_id=MASK, allowed_tokens=allowed)
            assert allowed[yb.y[yb.chosen]].all()


def test_each_subset_is_filled_from_its_own_z_row():
    x, mb, logits, gen = _y_setup()
    yb = build_y(x, mb.z, mb.masked, logits, k=2, n_y=3, temperature=0.0, generator=gen)
    argmax = logits.detach().argmax(-1).repeat_interleave(3, 0)
    assert yb.chosen.any() and torch.equal(yb.y[yb.chosen], argmax[yb.chosen])


def test_bad_y_settings_raise():
    x, mb, logits, gen = _y_setup()
    with pytest.raises(ValueError, match="prism.y_positions"):
        build_y(x, mb.z, mb.masked, logits, k=1, positions="leftmost")
    with pytest.raises(ValueError, match="prism.k"):
        build_y(x, mb.z, mb.masked, logits, k=0)


def test_nucleus_keeps_tokens_while_the_cumulative_probability_is_at_most_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(nucleus_filter(logits, 0.85))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(nucleus_filter(logits, 0.7)).sum() == 1  # ReMDM's rule: 0.3 would cross 0.7, so it goes
    assert torch.isfinite(nucleus_filter(logits, 0.4)).sum() == 1
    # top_p <= 0 still keeps the most likely token (an all -inf row would sample token 0).
    assert torch.isfinite(nucleus_filter(logits, 0.0)).tolist() == [[True, False, False, False]]


def test_y_never_proposes_the_mask_token():
    x, mb, logits, gen = _y_setup()
    peaked = logits.detach().clone()
    peaked[..., MASK] = 50.0  # the model's favourite token is the mask itself
    for temperature in (0.0, 1.0):
        yb = build_y(x, mb.z, mb.masked, peaked, k=3, temperature=temperature, generator=gen, mask_id=MASK)
        assert (yb.y[yb.chosen] != MASK).all()


def test_mdm_loss_is_ce_over_t_on_masked_positions():
    x, mb, logits, _ = _y_setup(batch=4, length=5)
    got = mdm_loss(logits, x, mb.masked, mb.t, lengths=x.shape[1])
    want = sum(F.cross_entropy(logits[b, i], x[b, i]) / mb.t[b]
               for b in range(4) for i in range(5) if mb.masked[b, i]) / 20
    assert torch.allclose(got, torch.as_tensor(want, dtype=got.dtype))
    # SFT data: each sample is normalised by its own answer length, then averaged over the batch.
    answer = torch.tensor([1.0, 2.0, 4.0, 5.0])
    got = mdm_loss(logits, x, mb.masked, mb.t, lengths=answer)
    want = sum(sum(F.cross_entropy(logits[b, i], x[b, i]) / mb.t[b] for i in range(5) if mb.masked[b, i]) / answer[b]
               for b in range(4)) / 4
    assert torch.allclose(got, torch.as_tensor(want, dtype=got.dtype))


def test_prism_loss_is_mean_bce_over_chosen_positions():
    q = torch.tensor([[2.0, -1.0, 0.5]])
    label = torch.tensor([[1.0, 0.0, 1.0]])
    chosen = torch.tensor([[True, True, False]])
    want = (-math.log(torch.sigmoid(torch.tensor(2.0))) - math.log(1 - torch.sigmoid(torch.tensor(-1.0)))) / 2
    assert abs(prism_loss(q, label, chosen).item() - want) < 1e-6


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.inputs = model, [], []

    def forward(self, tokens, need_logits=True, need_quality=True):
        self.calls.append((need_logits, need_quality))
        self.inputs.append(tokens.clone())
        return self.model(tokens, need_logits=need_logits, need_quality=need_quality)


def test_prism_step_makes_exactly_two_backbone_passes_and_trains_head_and_backbone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=32, n_blocks=1, n_heads=2, cond_dim=8), QualityHeadConfig(), 7, True)
    with torch.no_grad():  # leave the zero-init state so gradients reach every layer
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    counting = _CountingModel(model)
    x = torch.randint(1, 7, (8, 12))
    losses = compute_losses(counting, x, torch.zeros_like(x, dtype=torch.bool), MASK, "prism",
                            MaskingConfig(), PrismConfig(k=2, n_y=2, lam=0.5))
    assert counting.calls == [(True, False), (False, True)]
    # The head is shown y, not z: the second input is z (repeated n_y times) with exactly k of its masks filled.
    z, y = counting.inputs[0].repeat_interleave(2, 0), counting.inputs[1]
    filled = (z == MASK) & (y != MASK)
    assert torch.equal(filled.sum(1), (z == MASK).sum(1).clamp_max(2)) and filled.any()
    assert torch.equal(y[~filled], z[~filled])
    assert torch.allclose(losses.total, losses.prism + 0.5 * losses.mdm)
    losses.prism.backward(retain_graph=True)
    assert model.quality_head.final.linear.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn_qkv.weight.grad.abs().sum() > 0
    # The PRISM term trains head and backbone but never the unmasking head (y is stop-gradient data).
    assert model.backbone.output_layer.linear.weight.grad is None
    losses.mdm.backward()
    assert model.backbone.output_layer.linear.weight.grad.abs().sum() > 0


def test_quality_head_learns_to_separate_right_from_wrong_tokens():
    """A learnable toy: every sequence repeats one symbol, so a filled token is right iff it matches what else is
    visible. PRISM training through compute_losses must lift the head's AUROC on fresh batches above 0.8."""
    from prism_ds.core.metrics import auroc

    torch.manual_seed(1)  # seed 0 learns too, more slowly (AUROC 0.75 at 300 steps, 0.86 at 600)
    model = build_model(ModelConfig(hidden=32, n_blocks=1, n_heads=2, cond_dim=8), QualityHeadConfig(), 5, True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    cfg, masking = PrismConfig(k=2, lam=1.0), MaskingConfig()

    def batch(n=128):
        return torch.randint(1, 5, (n, 1), generator=gen).expand(n, 8).clone()

    def held_out_auroc():
        with torch.no_grad():
            out = compute_losses(model, batch(1024), torch.zeros(1024, 8, dtype=torch.bool), MASK, "prism", masking,
                                 cfg, generator=torch.Generator().manual_seed(1))
        return auroc(out.quality, out.label)

    before = held_out_auroc()
    for _ in range(300):
        x = batch()
        losses = compute_losses(model, x, torch.zeros_like(x, dtype=torch.bool), MASK, "prism", masking, cfg,
                                generator=gen)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    after = held_out_auroc()
    print(f"quality AUROC before {before:.3f}, after {after:.3f}")
    assert abs(before - 0.5) < 0.1 and after > 0.8
