"""The Token-Critic baseline (Lezama et al. 2022) as the PRISM authors' Sudoku code runs it: the critic model.

The critic is a separate DiT (the run's model.* sizes, trained from scratch as the authors' "adapter") with a
zero-initialised adaLN linear head on its last block: a PrismModel whose `quality` is the critic logit of each
token of a fully filled board x̂. It never predicts tokens, so its vocabulary projection is frozen and unused.

`CriticScored(f_theta, critic, ...)` puts it behind the sampler's model interface: its forward returns f_theta's
logits and, when quality is asked for, the critic's logits on x̂ = the input with every mask filled by a draw from
those logits (its own seeded generator). The "token-critic" remask policy then ranks by -quality, as "prism" does.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from prism_ds.config import QualityHeadConfig, load_config
from prism_ds.core.remask import parse_row
from prism_ds.core.sampler import fill_masks
from prism_ds.models.prism_model import PrismModel, PrismOutput, build_model
from prism_ds.models.weights import backbone_file, content_hash, load_backbone, load_quality_head, read_meta

CRITIC_HEAD = "linear"  # the authors' critic head: DDitFinalLayer(hidden -> 1) on the last block, zero-initialised
_SEED_OFFSET = 7_777_777  # the critic's x̂ draws never share the sampler generator's random stream


def build_critic(model_cfg, vocab_size: int, mask_id: int | None, dims: dict | None = None) -> PrismModel:
    """A fresh critic: a DiT of `dims` (default model.*) with the linear per-token head; its vocabulary
    projection is frozen (the critic reads the head only, and unused trainable weights would get no gradient)."""
    critic = build_model(model_cfg, QualityHeadConfig(kind=CRITIC_HEAD), vocab_size, with_head=True, mask_id=mask_id,
                         dims=dims)
    critic.backbone.output_layer.requires_grad_(False)
    return critic


def default_critic_path(run_dir: str | Path) -> Path:
    """Where `prism-ds train --stage critic` writes the critic of a run."""
    return Path(run_dir) / "critic" / "final"


def missing_critic_error(path: Path) -> FileNotFoundError:
    """The error for token-critic rows without a critic export: names the setting and the command that trains it."""
    return FileNotFoundError(
        f"sampler.critic: no critic export at {path} (no meta.json); the token-critic policy needs one: train it "
        f"with `prism-ds train --stage critic critic.steps=N` (the run's finetune export is its frozen f_theta), "
        f"or set sampler.critic=PATH to a critic export")


def load_critic(path: str | Path, device: torch.device | str = "cpu") -> PrismModel:
    """A critic export (`<run_dir>/critic/final`) in eval mode."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise missing_critic_error(path)
    meta = read_meta(path)
    if meta.get("stage") != "critic":
        raise ValueError(f"sampler.critic={str(path)!r} is a {meta.get('stage')!r} export, not a critic (trained by "
                         f"`prism-ds train --stage critic`)")
    cfg = load_config(str(path / "config.yaml"))
    critic = build_critic(cfg.model, meta["vocab_size"], meta.get("mask_id"), dims=meta.get("dit"))
    load_backbone(critic, path)
    load_quality_head(critic, path)
    return critic.to(device).eval()


def critic_for(policies: list[str], sampler_cfg, run_dir: str | Path, device: torch.device | str = "cpu",
               checkpoint: str | Path | None = None) -> tuple[PrismModel | None, Path | None]:
    """(critic, its export path) when any sampler row uses the token-critic policy, else (None, None).

    The path is sampler.critic, else <run_dir>/critic/final; a missing export is an error naming both. With
    `checkpoint` (the export sampled from), a critic trained against another f_theta than its backbone is warned
    about: its scores describe another model's x̂."""
    if not any(parse_row(p, sampler_cfg.remask_count)[0] == "token-critic" for p in policies):
        return None, None
    path = Path(sampler_cfg.critic) if sampler_cfg.critic else default_critic_path(run_dir)
    critic = load_critic(path, device)
    if checkpoint is not None:
        if read_meta(path)["vocab_size"] != read_meta(checkpoint)["vocab_size"]:
            raise ValueError(f"sampler.critic={str(path)!r} reads {read_meta(path)['vocab_size']} token ids but "
                             f"{checkpoint} has {read_meta(checkpoint)['vocab_size']}: a critic of another task")
        if read_meta(path).get("init") != content_hash([backbone_file(checkpoint)]):
            warnings.warn(f"sampler.critic={str(path)!r} was trained against another f_theta than the backbone of "
                          f"{checkpoint}; retrain it (`prism-ds train --stage critic`) to score this model's draws",
                          stacklevel=2)
    return critic, path


class CriticScored(nn.Module):
    """f_theta with Token-Critic scores as its quality: what the sampler runs for token-critic rows.

    forward(tokens, need_logits, need_quality) gives f_theta's logits and, when need_quality, the critic's logits
    on x̂: `tokens` with every mask filled by a draw from those logits (only allowed_tokens, never the mask; at the
    sampler's temperature / top_p) from the wrapper's own generator. x̂ is therefore an independent draw from the
    same distributions as the tokens the sampler commits that step, not those tokens themselves.
    """

    supports_kv_cache = False  # x̂ needs every position's logits

    def __init__(self, model: nn.Module, critic: nn.Module, mask_id: int, allowed_tokens: torch.Tensor | None = None,
                 seed: int = 0, temperature: float = 1.0, top_p: float = 1.0):
        super().__init__()
        self.model, self.critic, self.mask_id = model, critic, mask_id
        self.allowed_tokens, self.temperature, self.top_p = allowed_tokens, temperature, top_p
        self.seed, self.generator = seed + _SEED_OFFSET, None  # created on the first pass, on the tokens' device

    def forward(self, tokens: torch.Tensor, need_logits: bool = True, need_quality: bool = True,
                logits_cols: torch.Tensor | None = None, **kwargs) -> PrismOutput:
        """f_theta's logits (at logits_cols when given) and, when need_quality, the critic's logits on x̂ [B, L]."""
        if not need_quality:  # only what the model must be told: scripted and plain models take no logits_cols
            cols = {} if logits_cols is None else {"logits_cols": logits_cols}
            return PrismOutput(logits=self.model(tokens, need_logits=need_logits, need_quality=False, **cols,
                                                 **kwargs).logits)
        # x̂ fills every mask, so f_theta's logits are needed at every position, whatever columns were asked for.
        logits = self.model(tokens, need_logits=True, need_quality=False, **kwargs).logits
        if self.generator is None:
            self.generator = torch.Generator(device=tokens.device).manual_seed(self.seed)
        x_hat = fill_masks(logits, tokens, tokens == self.mask_id, self.mask_id, self.allowed_tokens,
                           temperature=self.temperature, top_p=self.top_p, generator=self.generator)
        quality = self.critic(x_hat, need_logits=False, need_quality=True).quality
        if not need_logits:
            logits = None
        elif logits_cols is not None:
            logits = logits[:, logits_cols]
        return PrismOutput(logits=logits, quality=quality)
