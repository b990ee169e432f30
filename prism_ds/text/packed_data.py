"""Packed document streams as MDLM trains on OpenWebText (`task: packed_text`).

Every document (the `text.text_field` column of JSONL/parquet rows, a whole .txt file, or a hub dataset's
rows) is tokenized without special tokens and followed by EOS; the documents are concatenated and cut into
chunks of max_length - 2 tokens, and each chunk becomes BOS + chunk + EOS (MDLM's `wrap`; GPT-2 has
BOS == EOS == <|endoftext|>). Unlike MDLM, which drops the remainder of every 1000-document `map` batch,
the tokens left over after a micro-batch are carried into the next one, so no text is lost.

The first `text.heldout_docs` non-empty documents of the whole source (unsharded, in file order) are held
out: `heldout_documents` returns them (MAUVE references), `heldout_sequences` packs them (validation
loss), and the training stream skips every document with the same text. Rows, rank shards, epochs, exact
resume and row errors are `prompt_data.RowStream`'s, shared with the prompt/solution stream.
"""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import replace
from typing import Iterator

import torch
from tqdm.auto import tqdm

from prism_ds.config import ConfigError, TextDataConfig
from prism_ds.text.prompt_data import (RowStream, TextBatch, _RowError, check_stream_args, missing_columns,
                                       resolve_source)

__all__ = ["PackedTextStream", "heldout_documents", "heldout_sequences", "wrap_ids", "pack"]

_READ_AHEAD = 32  # documents tokenized in one call (the fast tokenizer batches them); leftovers stay buffered
_PROGRESS_MIN = 2000  # held-out reads this long show a progress bar


def wrap_ids(tokenizer) -> tuple[int, int]:
    """(bos_id, eos_id) that wrap chunks: bos/eos tokens, else cls/sep as MDLM's get_tokenizer falls back to."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if bos is None or eos is None:
        raise ConfigError("text.tokenizer: packed_text needs a bos_token (or cls_token) and an eos_token "
                          "(or sep_token) to wrap each sequence")
    return int(bos), int(eos)


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of documents without special tokens; a literal '[MASK]' or '<|endoftext|>' in the text stays
    plain text (split_special_tokens), so clean data never holds the mask id."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def pack(buffer: list[int], n: int, max_length: int, bos: int, eos: int) -> torch.Tensor:
    """The first n chunks of max_length - 2 tokens of `buffer`, each as BOS + chunk + EOS: LongTensor [n, L]."""
    body = max_length - 2
    chunk = torch.tensor(buffer[:n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), bos), chunk, torch.full((n, 1), eos)], dim=1)


def _digest(text: str) -> bytes:
    """A document's identity for the held-out check."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _check_packed(cfg: TextDataConfig, micro_batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
    """ConfigError for unusable packed_text settings."""
    check_stream_args(cfg, micro_batch_size, rank, world_size, min_length=3)  # BOS + at least one token + EOS
    if not cfg.text_field:
        raise ConfigError("text.text_field: empty; set the document column of the rows (e.g. text)")
    if cfg.heldout_docs < 0:
        raise ConfigError(f"text.heldout_docs: must be >= 0, got {cfg.heldout_docs}")


class _Documents(RowStream):
    """Rows of a document source as texts (None for empty documents)."""

    def __init__(self, cfg: TextDataConfig, rank: int = 0, world_size: int = 1, scan_utf8: bool = True):
        super().__init__(cfg, rank, world_size, documents=True, scan_utf8=scan_utf8)
        self.field = "text" if self.builder == "text" else cfg.text_field  # .txt files: HF's "text" column

    def _check_row(self, row: dict) -> str | None:
        """The document of a row, None when it is empty; raises _RowError for a missing or non-string column."""
        if (err := missing_columns(row, [self.field])) is not None:
            raise _RowError(f"{err} (text.text_field={self.field!r})")
        value = row[self.field]
        if not isinstance(value, str):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise _RowError(f"column {self.field!r} (text.text_field) is not text: {shown}")
        return value if value.strip() else None

    def _document(self, row: dict) -> str | None:
        """_check_row with the error naming the file and row."""
        try:
            return self._check_row(row)
        except _RowError as e:
            raise ValueError(self._locate(e)) from None


# One entry: the held-out documents read last (the stream and the held-out batch of a run read the same ones).
_FIRST: dict[tuple, tuple[list[str], bool]] = {}


def _first_documents(cfg: TextDataConfig, n: int, progress: bool = False) -> list[str]:
    """The first n non-empty documents of the whole source in file order (unsharded, unshuffled): fewer when
    the source has fewer."""
    if n <= 0:
        return []
    builder, files = resolve_source(cfg.source, documents=True)
    stamp = tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files) if builder else ()
    key = (cfg.source, cfg.subset, cfg.split, cfg.text_field, stamp)
    if key in _FIRST and (len(_FIRST[key][0]) >= n or _FIRST[key][1]):
        return _FIRST[key][0][:n]
    reader = _Documents(replace(cfg, shuffle_buffer=0, heldout_docs=0), scan_utf8=False)
    docs: list[str] = []
    bar = tqdm(total=n, desc="held-out documents", unit="doc", disable=not progress or n < _PROGRESS_MIN)
    raw, exhausted = reader._raw(), False
    while len(docs) < n:
        row = next(raw)
        if reader._epoch > 0:  # the whole source was read
            exhausted = True
            break
        doc = reader._document(row)
        if doc is not None:
            docs.append(doc)
            bar.update()
    bar.close()
    _FIRST.clear()
    _FIRST[key] = (docs, exhausted)
    return list(docs)


def _need_heldout(cfg: TextDataConfig, what: str) -> None:
    """ConfigError when no documents are held out."""
    if cfg.heldout_docs <= 0:
        raise ConfigError(f"text.heldout_docs: is {cfg.heldout_docs}, so no documents are held out for {what}; "
                          "set it to the number of leading documents to keep out of training")


def heldout_documents(cfg: TextDataConfig, n: int | None = None, progress: bool = False) -> list[str]:
    """The first n (default: all text.heldout_docs) held-out documents as raw text (MAUVE references)."""
    _check_packed(cfg)
    _need_heldout(cfg, "reference texts")
    n = cfg.heldout_docs if n is None else n
    if n > cfg.heldout_docs:
        raise ConfigError(f"text.heldout_docs={cfg.heldout_docs}: {n} held-out documents were asked for; "
                          f"raise text.heldout_docs to at least {n}")
    docs = _first_documents(cfg, n, progress)
    if len(docs) < n:
        raise ConfigError(f"text.heldout_docs={cfg.heldout_docs}: {cfg.source!r} has only {len(docs)} non-empty "
                          f"documents, {n} were asked for")
    return docs


def heldout_sequences(cfg: TextDataConfig, tokenizer, n: int, progress: bool = False) -> torch.LongTensor:
    """Up to n sequences [n', L] packed from the held-out documents exactly as training packs (validation loss);
    the last incomplete chunk is dropped."""
    _check_packed(cfg)
    _need_heldout(cfg, "validation")
    if n < 1:
        raise ValueError(f"heldout_sequences: n must be >= 1, got {n}")
    bos, eos = wrap_ids(tokenizer)
    docs, buffer, need = _first_documents(cfg, cfg.heldout_docs, progress), [], n * (cfg.max_length - 2)
    for i in range(0, len(docs), 256):  # tokenize only as many documents as the n sequences take
        for ids in _tokenize(tokenizer, docs[i:i + 256]):
            buffer += ids
            buffer.append(eos)
        if len(buffer) >= need:
            break
    m = min(n, len(buffer) // (cfg.max_length - 2))
    if m == 0:
        raise ConfigError(f"text.heldout_docs={cfg.heldout_docs}: the held-out documents are {len(buffer)} tokens, "
                          f"less than one sequence of text.max_length={cfg.max_length} (minus BOS and EOS)")
    return pack(buffer, m, cfg.max_length, bos, eos)


class PackedTextStream(_Documents):
    """Endless, exactly resumable micro-batches [B, L] of one rank's shard of documents, packed as MDLM does."""

    def __init__(self, cfg: TextDataConfig, tokenizer, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 progress: bool = False):
        _check_packed(cfg, micro_batch_size, rank, world_size)
        self.tokenizer, self.micro_batch_size = tokenizer, micro_batch_size
        self.bos_id, self.eos_id = wrap_ids(tokenizer)
        super().__init__(cfg, rank, world_size)
        # Held out by content: the training shard may be shuffled and sharded, so positions cannot say which
        # rows were the source's first ones (a duplicate of a held-out document is skipped too).
        self._heldout = {_digest(d) for d in _first_documents(cfg, cfg.heldout_docs, progress)}
        self._buffer: list[int] = []  # tokens read but not yet yielded (the carried-over leftover)
        self.stats = {"documents": 0, "heldout_skipped": 0, "empty_documents": 0, "tokens": 0}

    def _read(self, raw: Iterator[dict]) -> bool:
        """Read the next few rows into the token buffer; True when some training document was added."""
        texts = []
        for _ in range(_READ_AHEAD):
            doc = self._document(next(raw))
            if doc is None:
                self.stats["empty_documents"] += 1
            elif self._heldout and _digest(doc) in self._heldout:
                self.stats["heldout_skipped"] += 1
            else:
                texts.append(doc)
        for ids in _tokenize(self.tokenizer, texts) if texts else []:
            self._buffer += ids
            self._buffer.append(self.eos_id)
        self.stats["documents"] += len(texts)
        return bool(texts)

    def _no_documents(self) -> ValueError:
        """The error for a shard without a single training document."""
        if self.cfg.heldout_docs:
            return ConfigError(f"text.heldout_docs={self.cfg.heldout_docs}: holds out every document of "
                               f"{self.cfg.source!r} that rank {self.rank} of {self.world_size} reads; lower it")
        return ValueError(f"text.source: rank {self.rank} of {self.world_size} found only empty documents in "
                          f"{self.cfg.source!r} (column text.text_field={self.field!r})")

    def __iter__(self) -> Iterator[TextBatch]:
        """Endless micro-batches from the current position."""
        return self._batches(self._start())

    def _batches(self, raw: Iterator[dict]) -> Iterator[TextBatch]:
        B, L = self.micro_batch_size, self.cfg.max_length
        need = B * (L - 2)
        while True:
            start, added = self._epoch, False
            while len(self._buffer) < need:
                added |= self._read(raw)
                if not added and self._epoch >= start + 2:  # a whole epoch without a training document
                    raise self._no_documents()
            x = pack(self._buffer, B, L, self.bos_id, self.eos_id)
            del self._buffer[:need]
            self.stats["tokens"] += x.numel()
            yield TextBatch(x, torch.zeros_like(x, dtype=torch.bool), torch.full((B,), L), 0, x.numel())

    def counters(self) -> dict[str, int]:
        """Documents packed so far on this rank, and the held-out ones it skipped."""
        return {k: self.stats[k] for k in ("documents", "heldout_skipped")}

    def state_dict(self) -> dict:
        """The exact position right after the last yielded batch, with the leftover tokens (picklable)."""
        return self._position() | {"buffer": torch.tensor(self._buffer, dtype=torch.long),
                                   "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue, at the next iter(), with exactly the batch after the saved one."""
        self._load_position(state)
        self._buffer = state["buffer"].tolist()
        self.stats = copy.deepcopy(state["stats"])
