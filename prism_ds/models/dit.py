"""MDLM-style DiT backbone for masked diffusion (token embedding, RoPE, adaLN blocks).

PRISM's Sudoku and OWT backbones. There is no time conditioning (MDLM's sigma is forced to 0),
so the adaLN conditioning vector is a learned constant rather than a timestep embedding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from prism_ds.models.backbone import BackboneOutput
from prism_ds.models.zero_init import zeros_


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding tables, cached per sequence length."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, broadcast over the sequence."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning vector."""

    def __init__(self, hidden: int, n_heads: int, cond_dim: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * hidden)
        zeros_(self.adaLN_modulation.weight, self.adaLN_modulation.bias)  # every block starts as the identity (adaLN-Zero)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, L, H = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(cond).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        q, k, v = self.qkv(h).view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        attn = F.scaled_dot_product_attention(q, k, v)  # MDLM drops out residual branches only
        x = x + gate_a[:, None] * self.dropout(self.attn_out(attn.transpose(1, 2).reshape(B, L, H)))
        h = modulate(self.norm2(x), shift_m, scale_m)
        return x + gate_m[:, None] * self.dropout(self.mlp(h))


class AdaLNFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a zero-initialised Linear (MDLM's output layer)."""

    def __init__(self, hidden: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden)
        zeros_(self.linear.weight, self.linear.bias, self.adaLN_modulation.weight, self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ConstantCondition(nn.Module):
    """The adaLN conditioning vector. MDLM embeds sigma; with sigma fixed to 0 that is a constant, so
    learn it directly. A module (not a bare parameter) so ZeRO-3's hooks gather it for backward."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cond_dim) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return F.silu(self.weight).expand(batch_size, -1)


class DiT(nn.Module):
    """Bidirectional DiT over token ids; returns unmasking logits and the hidden states heads need."""

    def __init__(self, vocab_size: int, hidden: int, n_blocks: int, n_heads: int, cond_dim: int,
                 mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"model.hidden={hidden} must be divisible by model.n_heads={n_heads}")
        self.hidden, self.cond_dim, self.vocab_size = hidden, cond_dim, vocab_size
        self.embed = nn.Embedding(vocab_size, hidden)
        self.cond = ConstantCondition(cond_dim)
        self.rotary = Rotary(hidden // n_heads)
        self.blocks = nn.ModuleList(DiTBlock(hidden, n_heads, cond_dim, mlp_ratio, dropout) for _ in range(n_blocks))
        self.output_layer = AdaLNFinalLayer(hidden, cond_dim, vocab_size)

    def forward(self, tokens: torch.Tensor, need_logits: bool = True, attention_mask: torch.Tensor | None = None,
                logits_cols: torch.Tensor | None = None) -> BackboneOutput:
        """Run the backbone; skip the vocabulary projection when only the quality head is needed.

        Sequences are fixed-length (boards, packed text), so there is no padding mask to honour.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the DiT backbone takes no padding mask (its sequences are fixed-length)")
        x = self.embed(tokens)
        cond = self.cond(tokens.shape[0]).to(x.dtype)
        rope = self.rotary(tokens.shape[1], x.device, x.dtype)
        for block in self.blocks:
            x = block(x, cond, rope)
        logits = self.output_layer(x if logits_cols is None else x[:, logits_cols], cond) if need_logits else None
        return BackboneOutput(logits=logits, last_hidden=x, cond=cond)
