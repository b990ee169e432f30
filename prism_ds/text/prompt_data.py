"""Streaming prompt/solution micro-batches for LLaDA-style SFT, for any model with a HF tokenizer.

Rows come from local JSONL/parquet files (or a hub dataset) through HF `datasets` in streaming mode,
sharded by rank with `split_dataset_by_node`. Each sequence is prompt tokens (fixed, never masked)
followed by solution tokens + EOS (the answer), both rendered by `text.prompt_format` (prompt_format.py).
`padding: eos` pads every sequence to max_length with EOS counted as answer (LLaDA); `padding: bucket`
sorts a pool of samples by length and pads each micro-batch only to its own longest sequence. The stream
is endless (epochs re-shuffle with seed + epoch) and resumes exactly: `state_dict()` is the position right
after the last yielded batch.

`RowStream` is the part every text stream shares (sources, HF streaming, rank shards, epochs, exact
resume, errors naming file and row); `packed_data.PackedTextStream` (MDLM-style documents) builds on it.
"""
from __future__ import annotations

import copy
import glob
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets.config as hf_config
import pyarrow.parquet as pq
import torch
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node

from prism_ds.config import ConfigError, TextDataConfig
from prism_ds.text.prompt_format import check_prompt_format, prompt_ids, solution_text
from prism_ds.text.tokenizer import load_tokenizer, special_ids

__all__ = ["TextBatch", "RowStream", "PromptSolutionStream", "load_tokenizer", "special_ids", "resolve_source"]

JSON_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXT = (".parquet",)
TEXT_EXT = (".txt",)  # documents only: each file is one document
_CHUNK = 1 << 24  # bytes per read of the UTF-8 scan


@dataclass
class TextBatch:
    """One micro-batch: token ids, never-masked prompt positions and per-sample answer lengths."""

    x: torch.Tensor  # [B, L] long
    fixed: torch.Tensor  # [B, L] bool, True on prompt tokens
    answer_len: torch.Tensor  # [B] long, solution + EOS + EOS pads
    pad_tokens: int  # EOS pads beyond each sample's own end
    tokens: int  # B * L


class _RowError(ValueError):
    """A bad row; the stream adds the file and row where it is."""


def _builder(path: str, documents: bool) -> str | None:
    """The HF builder that reads a local file ("json", "parquet", "text"), None when unsupported."""
    if path.endswith(PARQUET_EXT):
        return "parquet"
    if path.endswith(JSON_EXT):
        return "json"
    return "text" if documents and path.endswith(TEXT_EXT) else None


def resolve_source(source: str, documents: bool = False) -> tuple[str | None, list[str]]:
    """("json" | "parquet" | "text", files) for local sources, or (None, [name]) for a hub dataset name.

    `documents` also accepts .txt files (one document per file, builder "text")."""
    exts = JSON_EXT + PARQUET_EXT + (TEXT_EXT if documents else ())
    kinds_text = ".jsonl, .json, .parquet" + (" or .txt" if documents else "")
    parts = [p.strip() for p in source.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"text.source: empty; set a {kinds_text} path, glob or comma-separated list, or a hub name")
    files: list[str] = []
    for part in parts:
        path = Path(part).expanduser()
        if any(c in part for c in "*?["):
            hits = sorted(glob.glob(str(path), recursive=True))
            if not hits:
                raise ConfigError(f"text.source: no files match {part!r}")
            files += hits
        elif path.is_dir():
            hits = sorted(str(f) for f in path.iterdir() if f.name.endswith(exts))
            if not hits:
                raise ConfigError(f"text.source: directory {part!r} has no {kinds_text} files")
            files += hits
        elif path.is_file():
            files.append(str(path))
        elif len(parts) == 1 and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", part) and not part.endswith(exts):
            return None, [part]  # not a local path: a hub dataset (needs network)
        else:
            raise ConfigError(f"text.source: file {part!r} does not exist")
    kinds = {_builder(f, documents) for f in files}
    if None in kinds:
        bad = [f for f in files if _builder(f, documents) is None]
        raise ConfigError(f"text.source: unsupported file type {bad[0]!r} (expected {kinds_text})")
    if len(kinds) > 1:
        raise ConfigError(f"text.source: mixes {' and '.join(sorted(kinds))} files; use one format")
    return kinds.pop(), files


def check_utf8(path: str) -> None:
    """Raise ValueError naming file:line at the first non-UTF-8 byte (a byte scan, no JSON parsing)."""
    if path.endswith(".gz"):
        return  # compressed: left to the reader
    line, rest = 1, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            data = rest + chunk
            cut = len(data) if not chunk else data.rfind(b"\n") + 1  # decode whole lines only
            try:
                data[:cut].decode("utf-8")
            except UnicodeDecodeError as e:
                at, col = line + data.count(b"\n", 0, e.start), e.start - data.rfind(b"\n", 0, e.start)
                raise ValueError(f"{path}, line {at}: not valid UTF-8 ({e.reason} at byte {col})") from None
            line += data.count(b"\n", 0, cut)
            rest = data[cut:]
            if not chunk:
                return


def _local_rows(builder: str, files: list[str]) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of local files in file order; where is 'file, line N' or 'file, row N'."""
    for path in files:
        if builder == "text":
            yield path, {"text": Path(path).read_text(encoding="utf-8", errors="replace")}
        elif builder == "json":
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, text in enumerate(f, 1):
                    if text.strip():
                        try:
                            row = json.loads(text)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}, line {n}: invalid JSON ({e.msg} at character {e.pos + 1})") from None
                        yield f"{path}, line {n}", row if isinstance(row, dict) else {}
        else:
            n = 0
            for rb in pq.ParquetFile(path).iter_batches():
                for row in rb.to_pylist():
                    n += 1
                    yield f"{path}, row {n}", row


def _text(value, what: str) -> str:
    """A non-empty string field (numbers are accepted as text)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _RowError(f"{what} is not text: {value!r}")
    if not value.strip():
        raise _RowError(f"empty {what}")
    return value


def missing_columns(row: dict, need: list[str]) -> _RowError | None:
    """The error for a row lacking some of `need` (naming the columns it has), None when complete."""
    missing = [k for k in need if row.get(k) is None]
    if not missing:
        return None
    present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
    return _RowError(f"missing column(s) {', '.join(map(repr, missing))}; columns present: {present}")


def check_stream_args(cfg: TextDataConfig, micro_batch_size: int, rank: int, world_size: int, min_length: int) -> None:
    """ConfigError for the text.* settings every stream uses; ValueError for a bad batch size or rank."""
    for key, low in (("max_length", min_length), ("shuffle_buffer", 0)):
        if getattr(cfg, key) < low:
            raise ConfigError(f"text.{key}: must be >= {low}, got {getattr(cfg, key)}")
    if micro_batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}")


def _check_config(cfg: TextDataConfig, micro_batch_size: int, rank: int, world_size: int) -> None:
    """ConfigError for unusable prompt/solution text.* settings."""
    if cfg.overlong not in ("truncate", "drop"):
        raise ConfigError(f"text.overlong: expected 'truncate' or 'drop', got {cfg.overlong!r}")
    if cfg.padding not in ("eos", "bucket"):
        raise ConfigError(f"text.padding: expected 'eos' or 'bucket', got {cfg.padding!r}")
    if cfg.bucket_pool < 1:
        raise ConfigError(f"text.bucket_pool: must be >= 1, got {cfg.bucket_pool}")
    check_stream_args(cfg, micro_batch_size, rank, world_size, min_length=2)
    try:
        cfg.template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"text.template: {cfg.template!r} must use only the '{{prompt}}' field ({e})") from None
    if not cfg.messages_field:
        for key in ("prompt_field", "solution_field"):
            if not getattr(cfg, key):
                raise ConfigError(f"text.{key}: empty (or set text.messages_field for chat rows)")
    check_prompt_format(cfg.prompt_format)
    if cfg.prompt_format == "prism_code":  # the authors' rows: instruction, code and the function's name
        if cfg.messages_field:
            raise ConfigError("text.prompt_format=prism_code reads text.prompt_field, text.solution_field and "
                              "text.entry_point_field; unset text.messages_field")
        if not cfg.entry_point_field:
            raise ConfigError("text.entry_point_field: empty, but text.prompt_format=prism_code needs the column "
                              "naming each row's function")


class RowStream:
    """Endless, exactly resumable rows of one rank's shard of `text.source`, epoch after epoch.

    Subclasses define `_check_row(row)` (raises _RowError for a bad row): errors then name the first bad
    file and row of a local source. The position is (epoch, rows consumed in it, HF's iterator state).
    """

    def __init__(self, cfg: TextDataConfig, rank: int = 0, world_size: int = 1, documents: bool = False,
                 scan_utf8: bool = True):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.builder, self.files = resolve_source(cfg.source, documents=documents)
        if scan_utf8 and self.builder in ("json", "text"):  # a reader of only the first rows skips the full scan
            for path in self.files:
                check_utf8(path)
        self._dataset = self._build_dataset()
        # Position: epoch, raw rows consumed in it, HF's iterator state (no-shuffle case).
        self._epoch, self._consumed, self._hf_state, self._live = 0, 0, None, False

    def _build_dataset(self):
        """This rank's streaming HF dataset (sharded, then shuffled with a buffer when asked)."""
        cfg = self.cfg
        # Local files: HF would still ping the hub to count a download, which stalls seconds offline.
        counts = hf_config.HF_UPDATE_DOWNLOAD_COUNTS
        hf_config.HF_UPDATE_DOWNLOAD_COUNTS = counts and not self.builder
        extra = {"sample_by": "document"} if self.builder == "text" else {}  # a .txt file is one row
        try:
            if self.builder:
                ds = load_dataset(self.builder, data_files={cfg.split: self.files}, split=cfg.split, streaming=True,
                                  **extra)
            else:
                ds = load_dataset(self.files[0], cfg.subset or None, split=cfg.split, streaming=True)
        except (FileNotFoundError, ConnectionError) as e:
            raise ConfigError(f"text.source: cannot open {cfg.source!r} (split {cfg.split!r}): {e}") from e
        except Exception as e:  # the json builder reads rows to infer features: bad JSON can fail here
            if self.builder != "json":
                raise
            raise self._read_error(e) from e
        finally:
            hf_config.HF_UPDATE_DOWNLOAD_COUNTS = counts
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if cfg.shuffle_buffer > 0:
            ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)  # seed + epoch after set_epoch
        return ds

    def _check_row(self, row: dict) -> object:
        """Raise _RowError for a row this stream cannot use."""
        raise NotImplementedError

    # ---- errors

    def _locate(self, err: _RowError) -> str:
        """'file, line N: message' of the first local row with a problem, else the stream position."""
        if self.builder:
            for where, row in _local_rows(self.builder, self.files):
                try:
                    self._check_row(row)
                except _RowError as e:
                    return f"{where}: {e}"
        return (f"{self.cfg.source}, example {self._consumed} of rank {self.rank}'s shard "
                f"(epoch {self._epoch}): {err}")

    def _where(self, row: dict) -> str:
        """'file, line N' of a local row (searched on error only), else its position in the stream."""
        if self.builder:
            for where, candidate in _local_rows(self.builder, self.files):
                if candidate == row:
                    return where
        return f"{self.cfg.source}, example {self._consumed} of rank {self.rank}'s shard (epoch {self._epoch})"

    def _read_error(self, exc: Exception) -> ValueError:
        """A reader failure as a ValueError naming the bad file:line when it can be found."""
        if self.builder in ("json", "text"):
            for path in self.files:  # raises at the first non-UTF-8 byte
                check_utf8(path)
        if self.builder == "json":
            for _ in _local_rows(self.builder, self.files):  # raises at the first invalid JSON line
                pass
        return ValueError(f"text.source: cannot read {self.cfg.source!r}: {exc}")

    # ---- rows and position

    def _raw(self) -> Iterator[dict]:
        """Endless rows of this rank's shard, epoch after epoch, from the saved position."""
        exact_hf = self.cfg.shuffle_buffer == 0
        while True:
            ds = self._dataset
            ds.set_epoch(self._epoch)
            if exact_hf and self._hf_state is not None:
                ds.load_state_dict(self._hf_state)
            it = iter(ds)
            # HF's state_dict loses the shuffle buffer on resume, so with shuffling the epoch's seeded order
            # is replayed from its start and the consumed rows are skipped (read, not tokenized).
            skip = 0 if exact_hf else self._consumed
            while True:
                try:
                    row = next(it)
                except StopIteration:
                    break
                except Exception as e:
                    raise self._read_error(e) from e
                if skip:
                    skip -= 1
                    continue
                self._consumed += 1
                self._live = True  # from now on ds.state_dict() is the position after `row`
                yield row
            if self._consumed == 0:
                raise ValueError(f"text.source: rank {self.rank} of {self.world_size} got no rows from "
                                 f"{self.cfg.source!r}")
            self._epoch, self._consumed, self._hf_state, self._live = self._epoch + 1, 0, None, False

    def _start(self) -> Iterator[dict]:
        """Rows from the current position (what __iter__ of a subclass reads)."""
        self._hf_state, self._live = self._hf_position(), False
        return self._raw()

    def _hf_position(self) -> dict | None:
        """HF's iterator state right after the last row read (no-shuffle case only)."""
        if self.cfg.shuffle_buffer == 0 and self._live:
            return copy.deepcopy(self._dataset.state_dict())  # the paused iterator sits right after that row
        return copy.deepcopy(self._hf_state)

    def _position(self) -> dict:
        """The row position part of state_dict()."""
        return {"version": 1, "kind": type(self).__name__, "rank": self.rank, "world_size": self.world_size,
                "epoch": self._epoch, "consumed": self._consumed, "hf_state": self._hf_position()}

    def _load_position(self, state: dict) -> None:
        """Restore the row position of a state_dict() (checks it is this kind of stream and this shard)."""
        if state.get("kind", "PromptSolutionStream") != type(self).__name__:
            raise ValueError(f"text stream state is of a {state.get('kind')}, not a {type(self).__name__}: "
                             "the run's task changed")
        if (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            raise ValueError(f"text stream state is for rank {state.get('rank')} of {state.get('world_size')}, "
                             f"not rank {self.rank} of {self.world_size}: the shards differ")
        self._epoch, self._consumed = state["epoch"], state["consumed"]
        self._hf_state, self._live = copy.deepcopy(state["hf_state"]), False


class PromptSolutionStream(RowStream):
    """Endless, exactly resumable micro-batches of one rank's shard of prompt/solution rows."""

    def __init__(self, cfg: TextDataConfig, tokenizer, micro_batch_size: int, rank: int = 0, world_size: int = 1):
        _check_config(cfg, micro_batch_size, rank, world_size)
        check_prompt_format(cfg.prompt_format, tokenizer)  # "chat" needs a chat template: say so before any row
        self.tokenizer, self.micro_batch_size = tokenizer, micro_batch_size
        if tokenizer.eos_token_id is None:
            raise ConfigError("text.tokenizer: tokenizer has no eos_token (needed to end and pad answers)")
        self.eos_id = int(tokenizer.eos_token_id)
        super().__init__(cfg, rank, world_size)
        self.stats = {"samples": 0, "truncated": 0, "truncated_tokens": 0, "dropped": 0, "pad_tokens": 0, "tokens": 0}
        self._pending: list[list[tuple[list[int], list[int]]]] = []  # bucket mode: the pool's queued batches
        self._pools = 0

    # ---- rows -> token samples

    def _fields(self, row: dict) -> tuple[list[dict], str, str, str | None]:
        """(prompt messages, plain prompt text, solution, entry point or None) of one row; raises _RowError."""
        cfg = self.cfg
        code = cfg.prompt_format == "prism_code"  # only this format reads the entry point column
        need = [cfg.messages_field] if cfg.messages_field else [cfg.prompt_field, cfg.solution_field]
        need += [cfg.entry_point_field] if code else []
        if (err := missing_columns(row, need)) is not None:
            raise err
        if not cfg.messages_field:
            prompt = _text(row[cfg.prompt_field], f"prompt (column {cfg.prompt_field!r})")
            solution = _text(row[cfg.solution_field], f"solution (column {cfg.solution_field!r})")
            entry = None
            if code:
                entry = _text(row[cfg.entry_point_field], f"entry point (column {cfg.entry_point_field!r})")
            return [{"role": "user", "content": prompt}], prompt, solution, entry
        msgs = row[cfg.messages_field]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise _RowError(f"column {cfg.messages_field!r} must be a list of {{role, content}} messages")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise _RowError(f"no assistant message (the solution) in column {cfg.messages_field!r}")
        solution = _text(msgs[last]["content"], f"solution (last assistant message of {cfg.messages_field!r})")
        prompt_msgs = [{"role": m["role"], "content": m["content"] or ""} for m in msgs[:last]]
        plain = "\n\n".join(str(m["content"]) for m in prompt_msgs)
        _text(plain, f"prompt (messages before the last assistant one in {cfg.messages_field!r})")
        return prompt_msgs, plain, solution, None

    _check_row = _fields

    def _encode(self, row: dict) -> tuple[list[int], list[int]] | None:
        """(prompt ids, answer ids incl. EOS) of a row, None when over-long and dropped."""
        try:
            msgs, plain, solution, entry = self._fields(row)
        except _RowError as e:
            raise ValueError(f"{self._locate(e)}") from None
        tok, L, fmt = self.tokenizer, self.cfg.max_length, self.cfg.prompt_format
        prompt = prompt_ids(tok, fmt, plain, entry, self.cfg.template, messages=msgs)
        answer = tok(solution_text(fmt, solution), add_special_tokens=False)["input_ids"] + [self.eos_id]
        if len(prompt) + len(answer) > L:
            if self.cfg.overlong == "truncate" and len(prompt) >= L:  # no answer token would be left to train on
                raise ValueError(f"{self._where(row)}: the prompt alone is {len(prompt)} tokens, not shorter than "
                                 f"text.max_length={L}; raise text.max_length, or set text.overlong=drop to skip "
                                 f"such rows")
            if self.cfg.overlong == "drop":
                self.stats["dropped"] += 1
                return None
            self.stats["truncated"] += 1
            self.stats["truncated_tokens"] += len(prompt) + len(answer) - L
            answer = answer[:L - len(prompt)]  # cut answer (it then has no EOS: the text goes on)
        self.stats["samples"] += 1
        return list(prompt), answer

    # ---- the stream

    def _take(self, raw: Iterator[dict], n: int) -> list[tuple[list[int], list[int]]]:
        """The next n samples that fit (over-long ones dropped as configured)."""
        out, start_epoch = [], self._epoch
        while len(out) < n:
            sample = self._encode(next(raw))
            if sample is not None:
                out.append(sample)
            elif not out and self._epoch >= start_epoch + 2:
                raise ValueError(f"text.source: no row of {self.cfg.source!r} fits text.max_length="
                                 f"{self.cfg.max_length} (all dropped)")
        return out

    def _collate(self, samples: list[tuple[list[int], list[int]]], width: int) -> TextBatch:
        """Pad samples to `width` with EOS (pads are answer tokens) as one batch."""
        plen = torch.tensor([len(p) for p, _ in samples])
        lens = plen + torch.tensor([len(a) for _, a in samples])
        pos = torch.arange(width)
        x = torch.full((len(samples), width), self.eos_id, dtype=torch.long)
        x[pos < lens[:, None]] = torch.tensor(list(itertools.chain.from_iterable(p + a for p, a in samples)))
        pad = int((width - lens).sum())
        self.stats["pad_tokens"] += pad
        self.stats["tokens"] += x.numel()
        return TextBatch(x, pos < plen[:, None], width - plen, pad, x.numel())

    def _fill_pool(self, raw: Iterator[dict]) -> None:
        """Sort a pool of samples by length, cut it into micro-batches and queue them in a seeded order."""
        pool = sorted(self._take(raw, self.cfg.bucket_pool * self.micro_batch_size), key=lambda s: len(s[0]) + len(s[1]))
        mbs = self.micro_batch_size
        batches = [pool[i:i + mbs] for i in range(0, len(pool), mbs)]
        g = torch.Generator().manual_seed(((self.cfg.seed * 1_000_003 + self.rank) * 1_000_003 + self._pools) % 2**62)
        self._pending = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._pools += 1

    def head(self, n: int) -> TextBatch:
        """Up to n samples from the start of this shard, one pass without repeats, padded to max_length."""
        raw, samples = self._raw(), []
        while len(samples) < n:
            row = next(raw)
            if self._epoch > 0:  # the file is exhausted
                break
            sample = self._encode(row)
            if sample is not None:
                samples.append(sample)
        if not samples:
            raise ValueError(f"text: no row of {self.cfg.source!r} fits text.max_length={self.cfg.max_length}")
        return self._collate(samples, self.cfg.max_length)

    def __iter__(self) -> Iterator[TextBatch]:
        """Endless micro-batches from the current position."""
        return self._batches(self._start())

    def _batches(self, raw: Iterator[dict]) -> Iterator[TextBatch]:
        while True:
            if self.cfg.padding == "eos":
                yield self._collate(self._take(raw, self.micro_batch_size), self.cfg.max_length)
                continue
            if not self._pending:
                self._fill_pool(raw)
            samples = self._pending.pop(0)
            yield self._collate(samples, max(len(p) + len(a) for p, a in samples))

    def counters(self) -> dict[str, int]:
        """Over-long samples so far on this rank (truncated or dropped, by text.overlong) and the tokens cut."""
        return {k: self.stats[k] for k in ("truncated", "truncated_tokens", "dropped")}

    def state_dict(self) -> dict:
        """The exact position right after the last yielded batch (picklable)."""
        return self._position() | {"pending": copy.deepcopy(self._pending), "pools": self._pools,
                                   "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue, at the next iter(), with exactly the batch after the saved one."""
        self._load_position(state)
        self._pools, self._pending = state["pools"], copy.deepcopy(state["pending"])
        self.stats = dict(state["stats"])
