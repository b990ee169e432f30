"""TensorBoard monitoring of a training stage: window-averaged losses, throughput, head quality."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from prism_ds.core.metrics import auroc
from prism_ds.core.objective import StepLosses


class Monitor:
    """Accumulates micro-step results and writes them every `log_every` steps (rank 0 only)."""

    def __init__(self, log_dir: Path | None, log_every: int, n_ranks: int, config_text: str = ""):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
            self.writer.add_text("config", f"```\n{config_text}\n```")
        self.log_every, self.n_ranks = log_every, n_ranks
        self._reset(time.time())

    def _reset(self, now: float) -> None:
        self.losses, self.quality, self.labels, self.tokens, self.since = [], [], [], 0, now

    def record(self, losses: StepLosses) -> None:
        """Add one micro-step's losses, token count and quality/label pairs (rank 0 only: others keep nothing)."""
        if self.writer is None:
            return
        self.losses.append([losses.total.item(), losses.mdm.item(),
                            losses.prism.item() if losses.prism is not None else float("nan")])
        self.tokens += losses.tokens * self.n_ranks
        if losses.quality is not None:
            self.quality.append(losses.quality.cpu())
            self.labels.append(losses.label.cpu())

    def maybe_log(self, step: int, last_step: int, lr: float, grad_norm) -> dict[str, float]:
        """Write means over the window (not the last noisy micro-batch) when due; returns what was written."""
        if self.writer is None or not (step % self.log_every == 0 or step == last_step) or not self.losses:
            return {}
        now = time.time()
        total, mdm, prism = torch.tensor(self.losses).mean(0).tolist()
        scalars = {"loss/total": total, "loss/mdm": mdm, "lr": lr,
                   "throughput/tokens_per_s": self.tokens / max(now - self.since, 1e-9)}
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if self.quality:
            q, y = torch.cat(self.quality), torch.cat(self.labels)
            scalars |= {"loss/prism": prism, "quality/auroc": auroc(q, y), "quality/frac_correct": y.mean().item()}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self._reset(now)
        return scalars

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
