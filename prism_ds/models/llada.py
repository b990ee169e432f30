"""LLaDA (Nie et al. 2025) as a transformers PreTrainedModel, checkpoint-compatible with GSAI-ML/LLaDA-8B-Instruct.

Config fields and state-dict names are those of the official folder (`model.transformer.wte`,
`model.transformer.blocks.N.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}`,
`model.transformer.ln_f`, `model.transformer.ff_out`), so a downloaded folder loads with
`from_pretrained` (sharded safetensors, dtype, ZeRO-3) without trust_remote_code, and peft targets
q_proj / k_proj / v_proj. The architecture follows the facts checked against the official code:
- RMSNorm in fp32, cast back to the input dtype, then times the weight;
- RoPE with rotate-half pairing (i with i + head_dim/2), computed and applied in fp32;
- bidirectional attention, scale 1/sqrt(head_dim), K/V heads repeated for grouped queries;
- SwiGLU MLP ff_out(silu(ff_proj(h)) * up_proj(h)); no biases, untied output, no logit scaling.
The official code ignores attention masks (padded positions attend everywhere). Here a padding mask,
when given, is honoured through SDPA; training on EOS-padded batches passes none (EOS pads are
answer tokens in LLaDA's SFT recipe), which is then exactly the official computation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from prism_ds.models.flash import flash_attn_func

LLADA_MASK = "<|mdm_mask|>"  # LLaDA's tokenizer has no mask_token, only this added special token
# Official config values this implementation does not cover: loading such a folder is an error.
_SUPPORTED = {"block_type": ("llama",), "activation_type": ("silu",), "layer_norm_type": ("rms",),
              "alibi": (False,), "rope": (True,), "weight_tying": (False,), "include_bias": (False,),
              "include_qkv_bias": (False,), "scale_logits": (False,), "input_emb_norm": (False,),
              "attention_layer_norm": (False,), "block_group_size": (1,)}


class LLaDAConfig(PretrainedConfig):
    """The official LLaDA config.json fields (unknown extra fields are kept as attributes)."""

    model_type = "llada"

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int | None = None, n_layers: int = 32,
                 mlp_hidden_size: int = 12288, vocab_size: int = 126464, embedding_size: int | None = 126464,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 500000.0, max_sequence_length: int = 4096,
                 mask_token_id: int | None = 126336, init_std: float = 0.02, **kwargs):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.n_kv_heads = n_kv_heads or n_heads
        self.mlp_hidden_size, self.vocab_size, self.embedding_size = mlp_hidden_size, vocab_size, embedding_size
        self.rms_norm_eps, self.rope_theta, self.max_sequence_length = rms_norm_eps, rope_theta, max_sequence_length
        self.mask_token_id, self.init_std = mask_token_id, init_std
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and of the output projection (embedding_size, else vocab_size)."""
        return self.embedding_size or self.vocab_size

    def check_supported(self, where: str = "config.json") -> None:
        """Raise ValueError naming the first field whose value this implementation does not support."""
        for key, ok in _SUPPORTED.items():
            if hasattr(self, key) and getattr(self, key) not in ok:
                raise ValueError(f"{where}: {key}={getattr(self, key)!r} is not supported (prism-ds LLaDA implements "
                                 f"{key}={ok[0]!r})")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{where}: d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} "
                             f"must divide evenly")


@dataclass
class KVCache:
    """Per layer, the keys (after RoPE) and values of every canvas position, from the last full pass.

    A later pass may recompute a slice [lo, hi) of positions and read everything else from here: the
    prefix cache recomputes the current block and what follows, the dual cache the current block only.
    """

    keys: list[torch.Tensor]  # per layer [B, H_kv, L, head_dim]
    values: list[torch.Tensor]

    def rows(self, index: torch.Tensor) -> "KVCache":
        """The cache of a subset of the batch (rows that are still generating)."""
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values])


@dataclass
class LLaDAOutput(ModelOutput):
    """logits [B, L or W, V] (None when skipped), the post-ln_f hidden state of the computed positions,
    and, after a pass that fills it, the KV cache."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    kv_cache: KVCache | None = None


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [L, head_dim] for positions [L]: frequencies theta^(-2i/hd), duplicated as [f, f]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [B, H, L, hd] in fp32 (dimension i pairs with i + hd/2); returns x's dtype."""
    h = x.float()
    h1, h2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat((-h2, h1), dim=-1) * sin).to(x.dtype)


class LLaDABlock(GradientCheckpointingLayer):
    """One pre-norm block: x + attn_out(attention(attn_norm(x))), then x + SwiGLU(ff_norm(x))."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # the gate
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def attention(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                  use_flash: bool, cache: tuple | None = None) -> torch.Tensor:
        """cache: (keys, values, lo, hi, store): h holds positions [lo, hi); the other positions' keys and
        values come from keys/values (when given); store (a list) receives this pass's keys and values."""
        B, L, _ = h.shape
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            past_k, past_v, lo, hi, store = cache
            if store is not None:
                store.append((k, v))
            if past_k is not None:  # the slice is fresh, the rest of the canvas comes from the last full pass
                k = torch.cat([past_k[:, :, :lo], k, past_k[:, :, hi:]], dim=2)
                v = torch.cat([past_v[:, :, :lo], v, past_v[:, :, hi:]], dim=2)
        # flash_attn_func(): imported once per process; None (warned once) without flash-attn, then SDPA.
        half = q.dtype in (torch.float16, torch.bfloat16)
        flash = flash_attn_func() if use_flash and mask is None and q.is_cuda and half else None
        if flash is not None:  # [B, L, H, hd] layout; handles grouped K/V heads itself
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
            return out.reshape(B, L, -1)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return out.transpose(1, 2).reshape(B, L, -1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                use_flash: bool = False, cache: tuple | None = None) -> torch.Tensor:
        x = x + self.attn_out(self.attention(self.attn_norm(x), rope, mask, use_flash, cache))
        m = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDAModel(nn.Module):
    """Holds `transformer` (wte, blocks, ln_f, ff_out) so parameter names match the official checkpoint."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.d_model),
            blocks=nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            ff_out=nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False),
        ))


class LLaDAModelLM(PreTrainedModel):
    """LLaDA with a forward that returns logits and the post-ln_f hidden state in one pass."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        config.check_supported()
        self.model = LLaDAModel(config)
        self.use_flash_attention = False  # set by the loader (prism_ds.models.loading) on GPU when asked
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for models built from a config (tests, benchmarks): N(0, init_std), norms at 1."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (wte)."""
        return self.model.transformer.wte

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_logits: bool = True, logits_cols: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                fresh: tuple[int, int] | None = None, fill_cache: bool = False, **kwargs) -> LLaDAOutput:
        """input_ids [B, L] (the whole canvas); attention_mask [B, L] (1 = real token) masks padded keys, None
        attends everywhere; logits_cols [W]: project only those positions to the vocabulary.

        KV cache (sampling): fill_cache=True computes every position and returns their keys/values;
        fresh=(lo, hi) with kv_cache computes positions [lo, hi) only, reading the others' keys/values from
        the cache (hidden states and logits then cover [lo, hi); logits_cols stay canvas positions).
        """
        t = self.model.transformer
        lo, hi = fresh if fresh is not None else (0, input_ids.shape[1])
        if fresh is not None and kv_cache is None:
            raise ValueError("fresh=(lo, hi) needs the kv_cache of a full pass")
        x = t.wte(input_ids[:, lo:hi])
        positions = torch.arange(lo, hi, device=input_ids.device)
        rope = rope_tables(positions, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # keys only: padded queries still get (unused) outputs
        store = [] if fill_cache else None  # every block appends its (keys, values), in order
        for i, block in enumerate(t.blocks):
            cache = None
            if fill_cache or fresh is not None:
                past = (kv_cache.keys[i], kv_cache.values[i]) if fresh is not None else (None, None)
                cache = (*past, lo, hi, store)
            x = block(x, rope, mask, self.use_flash_attention, cache)
        h = t.ln_f(x)
        logits = None
        if return_logits:
            logits = t.ff_out(h if logits_cols is None else h[:, logits_cols - lo])
        filled = KVCache([k for k, _ in store], [v for _, v in store]) if fill_cache else None
        return LLaDAOutput(logits=logits, last_hidden_state=h, kv_cache=filled)


def register() -> None:
    """Make AutoConfig / AutoModel resolve model_type "llada" to these classes (no trust_remote_code)."""
    try:
        AutoConfig.register("llada", LLaDAConfig)
        AutoModel.register(LLaDAConfig, LLaDAModelLM)
    except ValueError:  # already registered in this process
        pass


register()
