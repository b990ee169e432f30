"""TensorBoard monitoring of a training stage (rank 0 writes; every rank contributes its losses).

Scalars: loss/{total,mdm,prism} averaged over the window and over ranks, lr/<group>, grad_norm,
throughput/{tokens_per_s,samples_per_s}, data/padding_fraction, data/{truncated,truncated_tokens,dropped}
(over-long text samples so far, all ranks), throughput/mfu and memory/peak_gib (GPU only: rank 0's peak allocated
memory since the last window), and quality/{auroc,frac_correct} of the head on
the training batches (the critic stage logs loss/critic instead of loss/prism). Held-out calibration adds
calibration/{ece,auroc,bce} and the calibration/reliability figure (engine/plots.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from prism_ds.core.calibration import expected_calibration_error
from prism_ds.core.metrics import auroc
from prism_ds.core.objective import StepLosses
from prism_ds.engine.distributed import device as dist_device
from prism_ds.engine.plots import reliability_figure

# Dense bf16 peak per GPU, for the MFU estimate (stage.peak_tflops overrides it).
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def train_flops_per_token(n_params: int, n_trainable: int, backbone_trains: bool) -> float:
    """Matmul FLOPs per token of a training pass: 2N forward, 2N for activation gradients when any backbone
    weight trains (LoRA included: the gradient crosses every layer), 2 N_trainable for weight gradients.
    Frozen weights get no weight gradients; a head-only run backpropagates through the head alone."""
    return 2 * n_params + (2 * n_params if backbone_trains else 0) + 2 * n_trainable


def _peak_flops(override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if dist_device().type != "cuda":  # CPU ranks (DS_ACCELERATOR=cpu on a GPU host too): no GPU peak applies
        return None
    name = torch.cuda.get_device_name(dist_device())
    return next((tf * 1e12 for key, tf in _PEAK_TFLOPS.items() if key in name), None)


class Monitor:
    """Accumulates micro-step results on device and writes window means every `log_every` steps."""

    def __init__(self, log_dir: Path | None, log_every: int, n_ranks: int, n_params: int, peak_tflops: float = 0.0,
                 config_text: str = "", purge_step: int | None = None, n_trainable: int | None = None,
                 backbone_trains: bool = True, term: str = "prism"):
        self.writer = None
        if log_dir is not None:
            # purge_step hides events a killed run wrote after its last checkpoint, so a resumed run's
            # curves continue without duplicated steps.
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
            if purge_step is None:
                self.writer.add_text("config", f"```\n{config_text}\n```")
        self.log_every, self.n_ranks, self.n_params = log_every, n_ranks, n_params
        self.n_trainable = n_params if n_trainable is None else n_trainable
        self.backbone_trains = backbone_trains
        self.term = term  # the scored term's name: loss/prism, or loss/critic for the Token-Critic baseline
        self.peak_flops = _peak_flops(peak_tflops)
        self._reset(time.time())

    def _reset(self, now: float) -> None:
        self.sums, self.count, self.quality, self.labels = None, 0, [], []
        self.tokens = self.samples = self.pad_tokens = self.data_tokens = 0
        self.since = now

    def record(self, losses: StepLosses, samples: int, pad_tokens: int = 0, data_tokens: int = 0) -> None:
        """Add one micro-step: losses stay on device (no sync per step); quality pairs on rank 0 only.

        data_tokens: tokens of the batch itself (padding fraction), not the backbone passes' tokens.
        """
        prism = losses.prism if losses.prism is not None else torch.zeros_like(losses.mdm)
        terms = torch.stack([losses.total.detach(), losses.mdm.detach(), prism.detach()]).float()
        self.sums = terms if self.sums is None else self.sums + terms
        self.count += 1
        self.tokens += losses.tokens
        self.samples += samples
        self.pad_tokens += pad_tokens
        self.data_tokens += data_tokens
        if self.writer is not None and losses.quality is not None:
            self.quality.append(losses.quality.float().cpu())
            self.labels.append(losses.label.cpu())

    def state_dict(self) -> dict:
        """The open logging window (saved with checkpoints so a resumed run logs the same means)."""
        return {"sums": None if self.sums is None else self.sums.cpu(), "count": self.count, "tokens": self.tokens,
                "samples": self.samples, "pad_tokens": self.pad_tokens, "data_tokens": self.data_tokens,
                "quality": self.quality, "labels": self.labels}

    def load_state_dict(self, state: dict) -> None:
        """Reopen a saved window (its throughput clock restarts now)."""
        sums = state["sums"]
        self.sums = None if sums is None else sums.to(dist_device())
        for key in ("count", "tokens", "samples", "pad_tokens", "data_tokens", "quality", "labels"):
            setattr(self, key, state[key])

    def due(self, step: int, last_step: int) -> bool:
        """Whether `step` is a logging step (every rank must agree: logging all-reduces)."""
        return step % self.log_every == 0 or step == last_step

    def log(self, step: int, lrs: dict[str, float], grad_norm, counters: dict[str, int] | None = None
            ) -> dict[str, float]:
        """Write the window's means (losses averaged over ranks, counters summed); every rank must call it."""
        now = time.time()
        counters = counters or {}
        sums = self.sums if self.sums is not None else torch.zeros(3, device=dist_device())
        # One all-reduce: the loss sums, then this rank's data counters.
        packed = torch.cat([sums, torch.tensor([float(v) for v in counters.values()], device=sums.device)])
        if torch.distributed.is_initialized() and self.n_ranks > 1:
            torch.distributed.all_reduce(packed)
        total, mdm, prism = (packed[:3] / max(self.count * self.n_ranks, 1)).tolist()
        elapsed = max(now - self.since, 1e-9)
        tokens = self.tokens * self.n_ranks
        scalars = {"loss/total": total, "loss/mdm": mdm, "throughput/tokens_per_s": tokens / elapsed,
                   "throughput/samples_per_s": self.samples * self.n_ranks / elapsed,
                   "data/padding_fraction": self.pad_tokens / max(self.data_tokens, 1)}
        scalars |= {f"lr/{name}": lr for name, lr in lrs.items()}
        scalars |= {f"data/{name}": v for name, v in zip(counters, packed[3:].tolist())}
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if self.peak_flops:  # tokens counts both passes of a PRISM step
            flops = train_flops_per_token(self.n_params, self.n_trainable, self.backbone_trains) * tokens
            scalars["throughput/mfu"] = flops / elapsed / (self.peak_flops * self.n_ranks)
        if dist_device().type == "cuda":  # what a user sizes micro batches by; reset so each window has its own peak
            scalars["memory/peak_gib"] = torch.cuda.max_memory_allocated(dist_device()) / 2**30
            torch.cuda.reset_peak_memory_stats(dist_device())
        if self.quality:
            q, y = torch.cat(self.quality), torch.cat(self.labels)
            scalars |= {f"loss/{self.term}": prism, "quality/auroc": auroc(q, y),
                        "quality/frac_correct": y.mean().item()}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        self._reset(now)
        return scalars

    def log_calibration(self, step: int, quality_logits: torch.Tensor, labels: torch.Tensor,
                        n_bins: int = 10) -> dict[str, float]:
        """ECE, AUROC, the unweighted BCE and a reliability diagram of sigmoid(g) vs 1[x_i = y_i] on held-out data."""
        probs, labels = quality_logits.float().sigmoid().cpu(), labels.float().cpu()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(quality_logits.float().cpu(), labels).item()
        scalars = {"calibration/ece": expected_calibration_error(probs, labels, n_bins), "calibration/bce": bce,
                   "calibration/auroc": auroc(probs, labels), "calibration/frac_correct": labels.mean().item()}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.add_figure("calibration/reliability", reliability_figure(probs, labels, n_bins), step)
        return scalars

    def log_validation(self, step: int, mdm_loss: float) -> None:
        """The MDM loss on the held-out sequences (same masks every time, so points are comparable)."""
        if self.writer is not None:
            self.writer.add_scalar("validation/mdm_loss", mdm_loss, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
