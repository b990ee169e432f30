"""Score samples files and lay them out as the paper's Table 2 (MAUVE / gen-PPL / entropy per policy and N).

`score_cell` writes `<samples>.scores.json` next to a samples file and reuses it while the samples file's
content hash and the scoring settings (scorer and its dtype, featuriser, references) are unchanged. `score_references`
scores the human text once for the "data" row. `table2` refuses to put cells made with different settings
(other than the policy row and the number of steps N) or scored differently into one table.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from prism_ds.models.weights import content_hash
from prism_ds.textgen import metrics
from prism_ds.textgen.samples import differing_keys, model_fingerprint, read_samples

ROW_KEY, COLUMN_KEY = "policy", "steps"  # the two settings a table varies; every other setting must agree
DATA_ROW = "data"


def _model_id(name: str | Path | None) -> str | None:
    """A local folder's content fingerprint, or the hub name as given."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return model_fingerprint(path) if path.is_dir() else str(name)


def _texts_hash(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


def _ref_texts(references: Sequence) -> list[str]:
    """Reference documents as text: strings, or records with a "text" field."""
    return [r["text"] if isinstance(r, dict) else r for r in references]


def _entropy(records: Sequence, scorer: str | Path) -> float:
    """Mean unigram entropy over the records' "tokens" (the generating model's ids, as MDLM/ReMDM); records
    without tokens are tokenised with the scorer's tokenizer (the same GPT-2 tokenizer for OpenWebText)."""
    seqs = [r["tokens"] for r in records if isinstance(r, dict) and "tokens" in r]
    if len(seqs) != len(records):
        tok = metrics.load_tokenizer(scorer)
        seqs = [r["tokens"] if isinstance(r, dict) and "tokens" in r else
                tok(r["text"] if isinstance(r, dict) else r, add_special_tokens=False)["input_ids"] for r in records]
    return metrics.mean_entropy(seqs)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    tmp.replace(path)


def _reference_features(texts: list[str], featurizer, device, max_len: int, batch_size: int, cache_dir: Path,
                        progress: bool) -> np.ndarray:
    """Human-text MAUVE features, cached on disk: every cell of a table compares with the same references."""
    key = hashlib.sha256(json.dumps([_model_id(featurizer), max_len, _texts_hash(texts)]).encode()).hexdigest()[:16]
    cache = cache_dir / f"mauve_references_{key}.npy"
    if cache.exists():
        return np.load(cache)
    feats = metrics.featurize(texts, featurizer, device, max_len, batch_size, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(cache)
    return feats


def score_cell(path: str | Path, scorer: str | Path, featurizer: str | Path | None = None,
               references: Sequence | None = None, device: str = "cpu", scorer_batch_size: int = 8,
               featurizer_batch_size: int = 8, mauve_max_len: int = 1024, seed: int = metrics.MAUVE_SEED,
               cache_dir: str | Path | None = None, progress: bool = False, scorer_dtype: str = "float32") -> dict:
    """Gen-PPL, entropy and (with a featuriser and references) MAUVE of one finished samples file, cached."""
    path = Path(path)
    settings, records = read_samples(path)
    wanted = settings.get("n_samples")
    if wanted is not None and len(records) != wanted:
        raise ValueError(f"{path}: holds {len(records)} of the {wanted} samples its settings ask for; finish it "
                         f"(rerun the sampling) before scoring")
    if not records:
        raise ValueError(f"{path}: no samples")
    ref_texts = _ref_texts(references) if references is not None else None
    with_mauve = featurizer is not None and ref_texts is not None
    score_settings = {"scorer": str(scorer), "scorer_id": _model_id(scorer),
                      "scorer_dtype": metrics.scorer_dtype(scorer_dtype)[0],
                      "featurizer": str(featurizer) if with_mauve else None,
                      "featurizer_id": _model_id(featurizer) if with_mauve else None,
                      "references": _texts_hash(ref_texts) if ref_texts is not None else None,
                      "n_references": len(ref_texts) if ref_texts is not None else None,
                      "mauve_max_len": mauve_max_len if with_mauve else None,
                      "mauve_seed": seed if with_mauve else None}
    out = path.with_name(path.name + ".scores.json")
    sha = content_hash([path])
    if out.exists():
        cached = json.loads(out.read_text(encoding="utf-8"))
        if cached.get("samples_sha256") == sha and cached.get("score_settings") == score_settings:
            return cached
    texts = [r.get("text", "") for r in records]
    ppl = metrics.generative_perplexity(texts, scorer, scorer_batch_size, device, scorer_dtype, progress=progress)
    mauve = None
    if with_mauve:
        p = _reference_features(ref_texts, featurizer, device, mauve_max_len, featurizer_batch_size,
                                Path(cache_dir) if cache_dir else path.parent, progress)
        q = metrics.featurize(texts, featurizer, device, mauve_max_len, featurizer_batch_size, progress)
        mauve = metrics.mauve_from_features(p, q, seed)
    result = {"samples": str(path), "samples_sha256": sha, "settings": settings, "score_settings": score_settings,
              ROW_KEY: settings.get(ROW_KEY), COLUMN_KEY: settings.get(COLUMN_KEY), "n": len(records),
              "mauve": mauve, "gen_ppl": ppl["gen_ppl"], "entropy": _entropy(records, scorer),
              "nll_per_token": ppl["nll_per_token"], "scored_tokens": ppl["tokens"], "sample_nll": ppl["sample_nll"]}
    _write_json(out, result)
    return result


def score_references(references: Sequence, scorer: str | Path, out: str | Path, device: str = "cpu",
                     scorer_batch_size: int = 8, progress: bool = False, scorer_dtype: str = "float32") -> dict:
    """The "data" row: gen-PPL and entropy of the human references (MAUVE 1 by definition), cached in `out`."""
    out = Path(out)
    texts = _ref_texts(references)
    score_settings = {"scorer": str(scorer), "scorer_id": _model_id(scorer),
                      "scorer_dtype": metrics.scorer_dtype(scorer_dtype)[0], "references": _texts_hash(texts),
                      "n_references": len(texts)}
    if out.exists():
        cached = json.loads(out.read_text(encoding="utf-8"))
        if cached.get("score_settings") == score_settings:
            return cached
    ppl = metrics.generative_perplexity(texts, scorer, scorer_batch_size, device, scorer_dtype, progress=progress)
    result = {"samples": str(out), "settings": None, "score_settings": score_settings, ROW_KEY: DATA_ROW,
              COLUMN_KEY: None, "n": len(texts), "mauve": 1.0, "gen_ppl": ppl["gen_ppl"],
              "entropy": _entropy(references, scorer), "nll_per_token": ppl["nll_per_token"],
              "scored_tokens": ppl["tokens"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, result)
    return result


def _check_same(cells: list[dict], data: list[dict]) -> None:
    """Refuse cells whose settings (other than policy and N) or scoring differ; errors name both files."""
    first = cells[0]
    base = {k: v for k, v in first["settings"].items() if k not in (ROW_KEY, COLUMN_KEY)}
    for c in cells[1:]:
        other = {k: v for k, v in c["settings"].items() if k not in (ROW_KEY, COLUMN_KEY)}
        diff = differing_keys(base, other)
        if diff:
            raise ValueError(f"{first['samples']} and {c['samples']} were sampled with different settings "
                             f"({', '.join(diff)}); only the policy row and N may differ within one table")
        diff = differing_keys(first["score_settings"], c["score_settings"])
        if diff:
            raise ValueError(f"{first['samples']} and {c['samples']} were scored differently "
                             f"({', '.join('score.' + k for k in diff)}); rescore them the same way")
    for d in data:
        keys = ("scorer", "scorer_id", "scorer_dtype")
        keys += ("references",) if first["score_settings"].get("references") else ()
        diff = [k for k in keys if d["score_settings"].get(k) != first["score_settings"].get(k)]
        if diff:
            raise ValueError(f"{d['samples']} (data row) and {first['samples']} were scored differently "
                             f"({', '.join('score.' + k for k in diff)})")


def _fmt(cell: dict | None, bold: bool = False) -> str:
    if cell is None:
        return ""
    m = cell.get("mauve")
    mauve = "—" if m is None else ("1.00" if cell[ROW_KEY] == DATA_ROW else f"{m:.3f}")
    if bold and m is not None:
        mauve = f"**{mauve}**"
    ppl = cell.get("gen_ppl")
    ppl = "—" if ppl is None or (isinstance(ppl, float) and math.isnan(ppl)) else f"{ppl:.1f}"
    return f"{mauve} / {ppl} / {cell['entropy']:.2f}"


def table2(cells: list[dict]) -> str:
    """Markdown in the layout of the paper's Table 2: rows = policies (data first), columns = N, cells
    "MAUVE / gen-PPL / entropy"; the best MAUVE of each column is bold."""
    data = [c for c in cells if c.get(ROW_KEY) == DATA_ROW]
    runs = [c for c in cells if c.get(ROW_KEY) != DATA_ROW]
    if len(data) > 1:
        raise ValueError(f"more than one data row: {', '.join(d['samples'] for d in data)}")
    if not runs:
        raise ValueError("no sampled cells to tabulate")
    _check_same(runs, data)
    grid: dict[tuple, dict] = {}
    for c in runs:
        key = (c[ROW_KEY], c[COLUMN_KEY])
        if key in grid:
            raise ValueError(f"{grid[key]['samples']} and {c['samples']} are the same cell ({ROW_KEY}={key[0]}, "
                             f"N={key[1]})")
        grid[key] = c
    rows = list(dict.fromkeys(c[ROW_KEY] for c in runs))  # the order the caller listed the policies in
    cols = sorted({c[COLUMN_KEY] for c in runs})
    best = {}
    for n in cols:
        scored = [grid[(r, n)]["mauve"] for r in rows if (r, n) in grid and grid[(r, n)]["mauve"] is not None]
        best[n] = max(scored) if len(scored) > 1 else None
    s = runs[0]["score_settings"]
    dtype = f" ({s['scorer_dtype']})" if s.get("scorer_dtype") else ""  # cells scored before it was recorded: none
    caption = (f"Cells: MAUVE ↑ / gen-PPL ↓ / entropy ↑ (nats), {runs[0]['n']} samples per cell; gen-PPL under "
               f"{s['scorer']}{dtype}"
               + (f"; MAUVE with {s['featurizer']} features against {s['n_references']} human texts"
                  if s.get("featurizer") else "; MAUVE not computed (—)") + ".")
    lines = [caption, "", "| policy | " + " | ".join(f"N = {n}" for n in cols) + " |",
             "|---|" + "---|" * len(cols)]
    if data:  # independent of N: the same human-text values under every column
        lines.append(f"| {DATA_ROW} | " + " | ".join(_fmt(data[0]) for _ in cols) + " |")
    for r in rows:
        cells_r = [_fmt(grid.get((r, n)), bold=(r, n) in grid and grid[(r, n)]["mauve"] is not None
                        and grid[(r, n)]["mauve"] == best[n]) for n in cols]
        lines.append(f"| {r} | " + " | ".join(cells_r) + " |")
    return "\n".join(lines)
