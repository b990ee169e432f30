"""Samples files for unconditional generation: JSONL written batch by batch, resumable after an interruption.

Line 1 is a header {"prism_ds_samples": 1, "settings": {...}} with everything the samples depend on (policy
row, N steps, seed, sequence length, model fingerprint, sampler-settings hash, n_samples, batch_size); every
further line is one sample {"i": index, "batch": batch index, ...record} (e.g. "tokens" and "text"). Batches
are appended whole and fsynced; on reopening, a truncated last line (a kill mid-write) and the samples of an
unfinished batch are dropped, and other settings are refused. A batch's samples depend only on its index
(the caller seeds from it), so a resumed file is identical to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from tqdm import tqdm

FORMAT = 1
HEADER_KEY = "prism_ds_samples"


def settings_hash(settings: dict) -> str:
    """Short stable hash of a JSON-able settings dict (e.g. the sampler settings of a cell)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(folder: str | Path) -> str:
    """Cheap fingerprint of a model folder (or a single checkpoint file): every file's relative name, size and
    a hash of its first and last MiB."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    if folder.is_file():
        folder = folder.parent
    for f in files:
        if any(part.startswith(".") for part in f.relative_to(folder).parts):
            continue  # editor / lock files do not change the model
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder).as_posix()}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def differing_keys(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two settings dicts (missing counts as different)."""
    return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def _canon(settings: dict) -> dict:
    """Settings as they read back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))  # Paths etc. as strings


class SampleFile:
    """One cell's samples JSONL: header with its settings, then samples appended in whole batches."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings = _canon(settings)
        self.records: list[dict] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_bytes(json.dumps({HEADER_KEY: FORMAT, "settings": self.settings}) + "\n", mode="wb")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        # A complete line ends with "\n": whatever follows the last newline was cut off mid-write.
        complete, tail = lines[:-1], lines[-1]
        try:
            header = json.loads(complete[0]) if complete else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get(HEADER_KEY) != FORMAT:
            raise ValueError(f"{self.path}: not a prism-ds samples file (its first line is not a samples header); "
                             f"move it away or choose another path")
        if header["settings"] != self.settings:
            raise ValueError(f"{self.path}: written with other settings ("
                             f"{', '.join(differing_keys(header['settings'], self.settings))} differ); use another "
                             f"path or the same settings")
        keep = len(complete[0]) + 1
        for n, line in enumerate(complete[1:], 2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(complete):  # a torn last line that happens to end at a newline
                    break
                raise ValueError(f"{self.path}, line {n}: not a JSON line") from None
            if rec.get("i") != len(self.records):
                raise ValueError(f"{self.path}, line {n}: sample index {rec.get('i')} where {len(self.records)} "
                                 f"was expected")
            self.records.append(rec)
            keep += len(line) + 1
        if keep != len(raw) or tail:
            self.truncate(len(self.records))

    def _write_bytes(self, text: str, mode: str = "ab") -> None:
        with self.path.open(mode) as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())  # a finished batch survives a crash of the machine, not only of the process

    def done(self) -> int:
        """How many samples the file holds."""
        return len(self.records)

    def append(self, batch_records: list[dict], batch: int | None = None) -> None:
        """Append one whole batch (a single write, then flush + fsync); records get their sample index."""
        start = len(self.records)
        rows = [{"i": start + k, **({"batch": batch} if batch is not None else {}), **rec}
                for k, rec in enumerate(batch_records)]
        self._write_bytes("".join(json.dumps(r) + "\n" for r in rows))
        self.records.extend(rows)

    def truncate(self, n: int) -> None:
        """Keep the header and the first n samples (drops torn lines and unfinished batches)."""
        self.records = self.records[:n]
        text = json.dumps({HEADER_KEY: FORMAT, "settings": self.settings}) + "\n"
        text += "".join(json.dumps(r) + "\n" for r in self.records)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.path)  # atomic: a second interruption leaves the old or the new file, never half


def read_samples(path: str | Path) -> tuple[dict, list[dict]]:
    """(settings, samples) of a samples file, read-only (a torn last line is ignored, not removed)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get(HEADER_KEY) != FORMAT:
        raise ValueError(f"{path}: not a prism-ds samples file")
    records = []
    for line in lines[1:-1]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return header["settings"], records


def fill_cell(path: str | Path, settings: dict, n_samples: int, batch_size: int,
              make_batch: Callable[[int, int], list[dict]], progress: bool = True) -> Path:
    """Write (or finish) `path` with n_samples samples, batch b = make_batch(b, size); returns the path.

    make_batch must be deterministic in its batch index (seed the sampler from it), so that a run resumed
    after an interruption writes the same file as an uninterrupted one.
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples ({n_samples}) and batch_size ({batch_size}) must be >= 1")
    for key, value in (("n_samples", n_samples), ("batch_size", batch_size)):
        if key in settings and settings[key] != value:
            raise ValueError(f"settings[{key!r}] = {settings[key]!r} but fill_cell was asked for {value!r}")
    # The batch size shapes the samples (batch b is seeded from b), so it belongs to the settings.
    f = SampleFile(path, {**settings, "n_samples": n_samples, "batch_size": batch_size})
    whole = n_samples if f.done() >= n_samples else f.done() // batch_size * batch_size
    if whole != f.done():  # an unfinished batch (kill between two lines of one write) is redone whole
        f.truncate(whole)
    n_batches = -(-n_samples // batch_size)
    first = -(-f.done() // batch_size)  # done() is a whole number of batches (or all n_samples)
    bar = tqdm(total=n_samples, initial=f.done(), desc=f"sampling {Path(path).name}", disable=not progress,
               unit="sample")
    for b in range(first, n_batches):
        size = min(batch_size, n_samples - b * batch_size)
        records = make_batch(b, size)
        if len(records) != size:
            raise ValueError(f"make_batch({b}, {size}) returned {len(records)} records, not {size}")
        f.append(records, batch=b)
        bar.update(size)
    bar.close()
    return f.path
