"""The DiT backbone, architecture- and checkpoint-compatible with MDLM's `models/dit.py` (Sahoo et al. 2024).

PRISM's Sudoku and OpenWebText backbones. Module and parameter names are MDLM's, so the released
`kuleshov-group/mdlm-owt` weights load with only their `backbone.` prefix removed (models/mdlm.py):
    vocab_embed.embedding, sigma_map.mlp.{0,2}, rotary_emb.inv_freq,
    blocks.N.{norm1, attn_qkv, attn_out, norm2, mlp.0, mlp.2, adaLN_modulation},
    output_layer.{norm_final, linear, adaLN_modulation}
There is no time conditioning (MDLM's OWT model and the Sudoku DiT both set it off): sigma is 0, so the
adaLN conditioning c = silu(sigma_map(0)) is the same vector for every sequence. With a mask id the
output is MDLM's SUBS parameterisation: log-probabilities in which the mask is never predicted and an
unmasked position keeps its token.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prism_ds.models.backbone import BackboneOutput
from prism_ds.models.flash import flash_attn_func
from prism_ds.models.zero_init import zeros_

NEG_INF = -1e6  # MDLM's "negative infinity": finite, so log-softmax and bf16 stay free of NaNs


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position tables (rotate-half pairing). inv_freq is a saved buffer, as in MDLM's checkpoints."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, 1, L, head_dim] in fp32; blocks cast them to q/k's dtype."""
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float().to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]


class LayerNorm(nn.Module):
    """MDLM's LayerNorm: normalised in fp32, scaled by a weight, no bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Back to the input dtype so bf16 weights downstream get bf16 inputs (MDLM relies on autocast instead).
        return (F.layer_norm(x.float(), [self.dim]) * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, broadcast over the sequence."""
    return x * (1 + scale[:, None]) + shift[:, None]


class EmbeddingLayer(nn.Module):
    """Token embedding held as a bare [V, H] parameter named `embedding` (MDLM's checkpoint layout)."""

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embedding)


class TimestepEmbedder(nn.Module):
    """sigma -> 256 sinusoidal features (cosines first) -> Linear -> SiLU -> Linear (MDLM's sigma_map)."""

    def __init__(self, cond_dim: int, n_freq: int = 256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning vector (MDLM's DDiTBlock)."""

    def __init__(self, hidden: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads, self.use_flash = n_heads, False
        # Registration order matters: MDLM's EMA weights are a list in parameters() order.
        self.norm1 = LayerNorm(hidden)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * hidden)
        zeros_(self.adaLN_modulation.weight, self.adaLN_modulation.bias)  # every block starts as the identity (adaLN-Zero)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # flash-attn is optional: without it (warned once) the pass runs SDPA, as LLaDA does, not an ImportError.
        flash = flash_attn_func() if self.use_flash and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) \
            else None
        if flash is not None:  # [B, L, H, D] layout
            return flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale 1/sqrt(head_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, L, H = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(cond).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = (r.to(q.dtype) for r in rope)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # not v (MDLM: identity on v)
        attn = self._attention(q, k, v)
        x = x + gate_a[:, None] * self.dropout(self.attn_out(attn.transpose(1, 2).reshape(B, L, H)))
        h = modulate(self.norm2(x), shift_m, scale_m)
        return x + gate_m[:, None] * self.dropout(self.mlp(h))


class AdaLNFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a zero-initialised Linear (MDLM's DDitFinalLayer)."""

    def __init__(self, hidden: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden)
        zeros_(self.linear.weight, self.linear.bias, self.adaLN_modulation.weight, self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def subs_log_probs(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation: the mask is never predicted; an unmasked position keeps its token."""
    logits = logits.clone()
    logits[..., mask_id] += NEG_INF
    logits = logits - logits.logsumexp(-1, keepdim=True)
    keep = (tokens != mask_id)[..., None]
    logits = logits.masked_fill(keep, NEG_INF)
    own = torch.where(keep, torch.zeros((), dtype=logits.dtype, device=logits.device),
                      logits.gather(-1, tokens[..., None]))
    return logits.scatter(-1, tokens[..., None], own)


class DiT(nn.Module):
    """Bidirectional DiT over token ids; returns unmasking logits and the hidden states heads need.

    mask_id: when given, logits are SUBS log-probabilities (MDLM); gradient_checkpointing recomputes each
    block in backward; use_flash runs attention with flash-attn on GPU in bf16/fp16 (SDPA otherwise).
    """

    def __init__(self, vocab_size: int, hidden: int, n_blocks: int, n_heads: int, cond_dim: int,
                 mlp_ratio: int = 4, dropout: float = 0.1, mask_id: int | None = None,
                 gradient_checkpointing: bool = False, use_flash: bool = False):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"model.hidden={hidden} must be divisible by model.n_heads={n_heads}")
        self.hidden, self.cond_dim, self.vocab_size, self.n_heads = hidden, cond_dim, vocab_size, n_heads
        self.mask_id, self.gradient_checkpointing = mask_id, gradient_checkpointing
        self.vocab_embed = EmbeddingLayer(hidden, vocab_size)
        self.sigma_map = TimestepEmbedder(cond_dim)
        self.rotary_emb = Rotary(hidden // n_heads)
        self.blocks = nn.ModuleList(DiTBlock(hidden, n_heads, cond_dim, mlp_ratio, dropout) for _ in range(n_blocks))
        self.output_layer = AdaLNFinalLayer(hidden, cond_dim, vocab_size)
        for block in self.blocks:
            block.use_flash = use_flash

    def condition(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """c = silu(sigma_map(sigma = 0)): no time conditioning, as MDLM's OWT model and the Sudoku DiT."""
        return F.silu(self.sigma_map(torch.zeros(batch_size, device=device)))

    def forward(self, tokens: torch.Tensor, need_logits: bool = True, attention_mask: torch.Tensor | None = None,
                logits_cols: torch.Tensor | None = None) -> BackboneOutput:
        """Run the backbone; skip the vocabulary projection when only the quality head is needed.

        Sequences are fixed-length (boards, packed text), so there is no padding mask to honour.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the DiT backbone takes no padding mask (its sequences are fixed-length)")
        x = self.vocab_embed(tokens)
        cond = self.condition(tokens.shape[0], tokens.device).to(x.dtype)
        rope = self.rotary_emb(tokens.shape[1], x.device)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, rope, use_reentrant=False)
            else:
                x = block(x, cond, rope)
        logits = None
        if need_logits:
            cols = slice(None) if logits_cols is None else logits_cols
            logits = self.output_layer(x[:, cols], cond)
            if self.mask_id is not None and self.training:
                # The training losses read masked positions through a softmax only, which the log-softmax and
                # the clean positions' copy do not change: only the mask column matters (half the step time).
                logits[..., self.mask_id] += NEG_INF
            elif self.mask_id is not None:
                logits = subs_log_probs(logits, tokens[:, cols], self.mask_id)
        return BackboneOutput(logits=logits, last_hidden=x, cond=cond)
