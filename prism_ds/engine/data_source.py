"""What a training stage reads: batches with never-masked positions and per-sample loss lengths.

A source is an endless, resumable iterator of `Batch`es for one rank: `next_batch()`, and
`state_dict()` / `load_state_dict()` to continue at exactly the next batch after a restart.
`build_task` picks the source of a run (`task: sudoku | text | packed_text`) with its vocabulary, mask
token and a held-out batch for the quality head's calibration.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prism_ds.config import ConfigError, RunConfig
from prism_ds.engine import distributed as dist_utils
from prism_ds.models import mdlm
from prism_ds.models.loading import mask_token_id, vocab_size as model_vocab
from prism_ds.sudoku.board import MASK_ID
from prism_ds.sudoku.data import board_spec, train_boards
from prism_ds.text.packed_data import PackedTextStream, heldout_sequences
from prism_ds.text.prompt_data import PromptSolutionStream
from prism_ds.text.tokenizer import load_tokenizer, special_ids

HELDOUT_SAMPLES = 256  # sequences the quality head's calibration is measured on (never trained on)
# Board draws get their own seed stream: sharing the masking generator's seed would replay the same
# random words as batch indices and as mask draws, coupling which board is seen with how it is masked.
_DATA_SEED = 7_919_000


@dataclass
class Batch:
    """One micro-batch for compute_losses."""

    x: torch.Tensor  # [B, L] clean tokens
    fixed: torch.Tensor  # [B, L] bool, never masked (Sudoku separators, prompts)
    lengths: torch.Tensor  # [B] float, MDM-loss normaliser per sample: its maskable positions
    pad_tokens: int = 0  # padding beyond each sample's end, for the padding-waste scalar

    def to(self, device: torch.device) -> "Batch":
        """The same batch on `device`."""
        return Batch(self.x.to(device), self.fixed.to(device), self.lengths.to(device), self.pad_tokens)


def _board_batch(x: torch.Tensor, fixed_row: torch.Tensor) -> Batch:
    """Fixed-length boards: the same never-masked positions in every row, loss normalised by the maskable
    count (the cells), so the MDM term is the paper's mean CE over masked positions in expectation."""
    return Batch(x, fixed_row[None].expand_as(x), torch.full((len(x),), float((~fixed_row).sum())))


def _text_batch(b, mask_window: int = 0) -> Batch:
    """A TextBatch as a Batch: loss normalised by each answer's length, or with mask_window > 0 only the first
    mask_window non-fixed positions of a row maskable and the normaliser min(answer length, mask_window)."""
    fixed, lengths = b.fixed, b.answer_len.float()
    if mask_window > 0:  # the authors' LLaDA run masks only the first 512 answer positions (EOS pads included)
        fixed = fixed | ((~fixed).cumsum(1) > mask_window)
        lengths = lengths.clamp(max=mask_window)
    return Batch(b.x, fixed, lengths, b.pad_tokens)


class BoardBatches:
    """Uniformly sampled micro-batches of fixed-length sequences (Sudoku boards), resumable by RNG state."""

    def __init__(self, rows: torch.Tensor, fixed_row: torch.Tensor, micro_batch_size: int, seed: int):
        self.rows, self.fixed_row, self.micro_batch_size = rows, fixed_row, micro_batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> Batch:
        """A micro-batch drawn with replacement."""
        idx = torch.randint(0, len(self.rows), (self.micro_batch_size,), generator=self.generator)
        return _board_batch(self.rows[idx], self.fixed_row)

    def counters(self) -> dict[str, int]:
        """Nothing to count: every board fits."""
        return {}

    def state_dict(self) -> dict:
        """The sampler's RNG state (the data position of a random-access source)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the batches that follow the saved state."""
        self.generator.set_state(state["generator"])


class TextBatches:
    """Text micro-batches streamed through HF datasets, sharded by rank (prompt/solution or packed documents)."""

    def __init__(self, stream, mask_window: int = 0):
        self.stream, self.mask_window, self._iter = stream, mask_window, None

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank's shard (prompt tokens fixed, loss normalised by answer length;
        packed documents: nothing fixed, normalised by L)."""
        if self._iter is None:
            self._iter = iter(self.stream)
        return _text_batch(next(self._iter), self.mask_window)

    def counters(self) -> dict[str, int]:
        """The stream's counts so far on this rank (over-long samples; packed: documents, held-out skips)."""
        return self.stream.counters()

    def state_dict(self) -> dict:
        """The stream's exact position."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position."""
        self.stream.load_state_dict(state)
        self._iter = None


@dataclass
class Task:
    """A run's data for one rank: the training source, a held-out batch and the vocabulary."""

    source: BoardBatches | TextBatches
    heldout: Batch | None
    vocab_size: int
    mask_id: int
    seq_len: int
    maskable: int  # positions of a sequence that can be masked (bounds prism.k)
    allowed_tokens: torch.Tensor | None = None  # bool [V]: what sampling (and so y) may put in a position


def mask_seed(cfg: RunConfig, rank: int) -> int:
    """Seed of a rank's masking and y-construction generator (distinct from every rank's data seed)."""
    return cfg.seed * 1000 + rank + 1


def _sudoku_task(cfg: RunConfig, micro_batch_size: int, rank: int, progress: bool) -> Task:
    spec = board_spec(cfg)
    if rank == 0:  # rank 0 generates (or validates) the boards; the others then read its file
        train_boards(cfg, progress)
    dist_utils.barrier()
    boards = train_boards(cfg, progress=False)
    n_heldout = min(HELDOUT_SAMPLES, len(boards) // 10)  # boards the head is calibrated on, never trained on
    train, heldout = boards[:len(boards) - n_heldout], boards[len(boards) - n_heldout:]
    fixed = spec.separator_mask()
    return Task(BoardBatches(train, fixed, micro_batch_size, seed=_DATA_SEED + cfg.seed * 1000 + rank),
                _board_batch(heldout, fixed) if n_heldout else None,
                spec.vocab_size, MASK_ID, spec.seq_len, int((~fixed).sum()), spec.digit_tokens())


def _text_task(cfg: RunConfig, micro_batch_size: int, rank: int, world_size: int) -> Task:
    text = cfg.text
    if cfg.model.kind != "dit" and not text.tokenizer:  # a model folder carries its own tokenizer
        text = replace(text, tokenizer=cfg.model.path)
    tokenizer = load_tokenizer(text)
    allowed = None
    if cfg.model.kind == "dit":
        vocab_size, mask_id, _ = special_ids(tokenizer)
    else:
        vocab_size, mask_id = model_vocab(cfg.model.path), mask_token_id(cfg.model.path, tokenizer)
        if len(tokenizer) > vocab_size:
            raise ConfigError(f"text.tokenizer: {len(tokenizer)} tokens, but the model in {cfg.model.path} has only "
                              f"{vocab_size} embedding rows (config.json): tokenizer and checkpoint do not match")
        # LLaDA pads its embedding (126464 rows, 126349 tokens): rows past the tokenizer are never proposed.
        allowed = torch.arange(vocab_size) < len(tokenizer)
    stream = PromptSolutionStream(text, tokenizer, micro_batch_size, rank=rank, world_size=world_size)
    heldout, window = None, cfg.prism.mask_window
    if text.heldout_source:
        held = PromptSolutionStream(replace(text, source=text.heldout_source, shuffle_buffer=0),
                                    tokenizer, micro_batch_size)
        heldout = _text_batch(held.head(HELDOUT_SAMPLES), window)
    # Rows whose answer has fewer than prism.k masked tokens fill all of them (build_y).
    maskable = min(text.max_length - 1, window or text.max_length)
    return Task(TextBatches(stream, window), heldout, vocab_size, mask_id, text.max_length, maskable, allowed)


def _packed_task(cfg: RunConfig, micro_batch_size: int, rank: int, world_size: int, progress: bool) -> Task:
    """MDLM-style packed documents (OpenWebText): every position maskable, loss normalised by L."""
    text, kind = cfg.text, cfg.model.kind
    if kind == "mdlm" and not text.tokenizer:  # an MDLM folder may carry its tokenizer; a .ckpt never does
        if not Path(cfg.model.path).is_dir():
            raise ConfigError("text.tokenizer: empty and model.path is not a folder with one; set text.tokenizer "
                              "(MDLM's OWT model uses GPT-2's: text.tokenizer=gpt2 or a local copy)")
        text = replace(text, tokenizer=cfg.model.path)
    tokenizer = load_tokenizer(text)
    if kind == "dit":
        vocab_size, mask_id, _ = special_ids(tokenizer)
    elif kind == "mdlm":
        vocab_size, mask_id = mdlm.vocab_and_mask(cfg.model.path, tokenizer)  # raises when they do not match
    else:
        raise ConfigError(f"model.kind={kind!r}: task=packed_text trains a 'dit' or an 'mdlm' checkpoint")
    # Sampling (and so y) proposes real tokens only: never the mask, nor embedding rows past the tokenizer.
    allowed = torch.arange(vocab_size) < len(tokenizer)
    allowed[mask_id] = False
    stream = PackedTextStream(text, tokenizer, micro_batch_size, rank=rank, world_size=world_size,
                              progress=progress and rank == 0)
    L, heldout = text.max_length, None
    if text.heldout_docs > 0:
        x = heldout_sequences(text, tokenizer, HELDOUT_SAMPLES)
        heldout = Batch(x, torch.zeros_like(x, dtype=torch.bool), torch.full((len(x),), float(L)))
    return Task(TextBatches(stream), heldout, vocab_size, mask_id, L, L, allowed)


def build_task(cfg: RunConfig, micro_batch_size: int, rank: int, world_size: int, progress: bool = True) -> Task:
    """The training data of `cfg.task` for this rank."""
    window = cfg.prism.mask_window
    if window < 0 or (window and cfg.task != "text"):
        raise ConfigError(f"prism.mask_window={window}: must be >= 0, and applies to task=text only (prompt/solution "
                          f"rows; 0 = every answer position maskable), not task={cfg.task}")
    if cfg.task == "sudoku":
        return _sudoku_task(cfg, micro_batch_size, rank, progress)
    if cfg.task == "text":
        return _text_task(cfg, micro_batch_size, rank, world_size)
    if cfg.task == "packed_text":
        return _packed_task(cfg, micro_batch_size, rank, world_size, progress)
    raise ConfigError(f"task={cfg.task!r}: expected 'sudoku', 'text' or 'packed_text'")
