"""Text-generation metrics of the paper's Table 2: generative perplexity, unigram entropy and MAUVE.

* Generative perplexity (MDLM / ReMDM convention): the texts are retokenised with a causal LM's own
  tokenizer (GPT-2 large in the paper) and scored by it in fp32 (`text_eval.scorer_dtype`); the corpus value is
  exp(total NLL / total scored tokens), a token-weighted mean over all samples. Which tokens are scored differs
  from MDLM's code: see `generative_perplexity`.
* Entropy: of each sample's empirical token distribution (nats), averaged over samples.
* MAUVE (Pillutla et al. 2021) through the `mauve-text` package, with its own featurisation convention
  (final-layer hidden state of each text's last token, texts truncated to 1024 tokens) computed here so a
  local featuriser folder works offline and the human-text features can be cached between cells.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from prism_ds.config import ConfigError
from prism_ds.text.tokenizer import is_local_path

MAUVE_SEED = 25  # mauve-text's default k-means seed, set explicitly so scores are reproducible
# The scorer's weight dtypes. MDLM, ReMDM and the PRISM authors load GPT-2 large with from_pretrained's default,
# fp32; bf16 weights shift every NLL a little, so a bf16 score is a different number (recorded with each score).
SCORER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelUnavailableError(FileNotFoundError):
    """A scorer or featuriser model that cannot be loaded (offline and not a local folder)."""


def _unavailable(name: str, role: str, setting: str, reason: str) -> ModelUnavailableError:
    hub = name if not is_local_path(name) else "gpt2-large"
    return ModelUnavailableError(
        f"the {role} model {name!r} is not available here ({reason}). Provide it as a local folder: on a machine "
        f"with internet run `huggingface-cli download {hub} --local-dir DIR` (or save it with "
        f"AutoModel.from_pretrained('{hub}').save_pretrained(DIR) plus its tokenizer), copy DIR to this machine, "
        f"then pass {setting}=DIR")


def _from_pretrained(cls, name: str, role: str, setting: str):
    """cls.from_pretrained(name) for a local folder or a hub name, or a clear ModelUnavailableError."""
    if is_local_path(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise _unavailable(name, role, setting, "no such folder" if not path.exists() else "no config.json in it")
        return cls.from_pretrained(path)
    try:  # the local cache first: an offline machine would otherwise retry the hub for ~45 s
        return cls.from_pretrained(name, local_files_only=True)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
            raise _unavailable(name, role, setting, "not in the Hugging Face cache and the hub is offline") from None
    try:
        return cls.from_pretrained(name)
    except OSError as e:
        raise _unavailable(name, role, setting, str(e).splitlines()[0]) from None


def load_tokenizer(name: str | Path, role: str = "scorer", setting: str = "text_eval.scorer"):
    """The tokenizer of a scorer / featuriser folder or hub name (clear error when unavailable)."""
    return _from_pretrained(AutoTokenizer, str(name), role, setting)


def load_pretrained(name: str | Path, role: str, setting: str, causal: bool):
    """(model, tokenizer) from a local folder or a hub name; a clear ModelUnavailableError otherwise."""
    model = _from_pretrained(AutoModelForCausalLM if causal else AutoModel, str(name), role, setting)
    return model, load_tokenizer(name, role, setting)


_CACHE: dict = {}  # one loaded model per role: scoring many cells loads GPT-2 large once


def _cached(name, role: str, setting: str, causal: bool, device, dtype: torch.dtype):
    key = (str(name), causal, str(device), dtype)
    if _CACHE.get(role, (None,))[0] != key:
        _CACHE.pop(role, None)
        model, tok = load_pretrained(name, role, setting, causal)
        _CACHE[role] = (key, model.to(device=device, dtype=dtype).eval(), tok)
    return _CACHE[role][1], _CACHE[role][2]


def _max_positions(model, tokenizer) -> int:
    """The scorer's context length (GPT-2: n_positions = 1024)."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    if 1 < getattr(tokenizer, "model_max_length", 0) < 10**6:
        return tokenizer.model_max_length
    raise ValueError(f"cannot tell the context length of {type(model).__name__}; set max_position_embeddings")


def _padded(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention mask) [n, longest] of right-padded id lists."""
    width = max(map(len, seqs))
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
    return tokens.to(device), mask.to(device)


def _windows(ids: list[int], length: int) -> list[list[int]]:
    """Windows of at most `length` tokens overlapping by one, so every token after the first is scored exactly
    once and each window's first token is context only (MDLM splits without overlap and loses one per chunk)."""
    step = length - 1
    return [ids[start:start + length] for start in range(0, max(len(ids) - 1, 0), step)]


def scorer_dtype(name: str | torch.dtype) -> tuple[str, torch.dtype]:
    """(name, torch dtype) of a `text_eval.scorer_dtype` value: float32 or bfloat16, anything else an error."""
    for key, dtype in SCORER_DTYPES.items():
        if name == key or name == dtype:
            return key, dtype
    raise ConfigError(f"text_eval.scorer_dtype={name!r}: expected one of {', '.join(SCORER_DTYPES)} (float32 is "
                      f"what MDLM, ReMDM and the PRISM authors score generative perplexity in)")


@torch.no_grad()
def generative_perplexity(texts: Sequence[str], scorer: str | Path, batch_size: int = 8, device: str = "cpu",
                          dtype: str | torch.dtype = "float32", progress: bool = False) -> dict:
    """Perplexity of `texts` under the causal LM `scorer`: exp(total NLL / total scored tokens), per-sample NLLs.

    The scorer's weights are in `dtype` (float32 by default, as MDLM / ReMDM / the PRISM authors; bfloat16 on
    request), the log-softmax in fp32. Which tokens are scored, here and in MDLM's code (kuleshov-group/mdlm
    `diffusion.py`: `Diffusion.eval_retokenize` and `Diffusion.compute_generative_perplexity`, copied unchanged by
    ReMDM's `diffusion.py` and the PRISM authors' `eval_metric.py`: `TextEvaluator`):

    * MDLM retokenises each text with `truncation=True, max_length=config.model.length` (1024 for OWT), so a
      text's tokens past model.length are dropped, and pads a batch to its longest text with EOS on the right (GPT-2
      has no pad token; attention_mask 0 there). prism-ds never truncates: a text longer than the scorer's context
      is cut into windows that overlap by one token.
    * MDLM adds no BOS (GPT-2's tokenizer adds none) and splits each padded row into eval_context_size = 1024 chunks
      without overlap (one chunk when model.length is 1024); a chunk's first token is context only, never scored.
      prism-ds prepends the scorer's BOS (GPT-2: <|endoftext|>) unless the text already starts with it, so a
      sample's first token is scored; each later window's first token is the previous window's last.
    * MDLM's token mask is `first_eos[..., 1:] + token_mask[..., 1:]` with first_eos = (chunk == EOS).cumsum(-1) == 1
      and token_mask = chunk != EOS: every non-EOS token from the chunk's second position on is scored (text after
      an EOS included: nothing after the first EOS is dropped), and of the EOS tokens only the chunk's first one,
      and only when it is not at position 0. MDLM's OWT samples usually start with EOS (its packed training rows
      begin with BOS = EOS), so in practice none of their EOS tokens is scored; but in a padded row with no EOS
      of its own, the first padding EOS is (predicted from the row's last real token). prism-ds scores every
      token after the BOS (prepended, or the text's own leading EOS), EOS tokens included, exactly once, and never
      a padding position.
    * MDLM scores batches of `eval.perplexity_batch_size` and skips the last len(texts) % batch_size texts
      (num_batches = n // batch_size); prism-ds scores every text.
    * Both: NLLs summed over all scored tokens of all texts and divided by their count (torchmetrics MeanMetric
      with the mask as weights), gen-PPL = exp of that mean.
    """
    dtype_name, dtype = scorer_dtype(dtype)
    device = torch.device(device)
    model, tok = _cached(scorer, "scorer", "text_eval.scorer", True, device, dtype)
    length = _max_positions(model, tok)
    bos = tok.bos_token_id  # GPT-2: <|endoftext|>, the context GPT-2 saw at every document start
    encoded = tok(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    # Samples that already start with it (MDLM's packed sequences do) are not given a second one.
    ids = [([bos] if bos is not None and list(e)[:1] != [bos] else []) + list(e) for e in encoded]
    windows = [(i, w) for i, seq in enumerate(ids) for w in _windows(seq, length)]
    windows.sort(key=lambda iw: -len(iw[1]))  # similar lengths share a batch: less padding
    nll = [0.0] * len(ids)
    count = [0] * len(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0  # any id: padded positions are masked
    for b in tqdm(range(0, len(windows), batch_size), desc="gen-PPL", disable=not progress):
        chunk = windows[b:b + batch_size]
        tokens, mask = _padded([w for _, w in chunk], pad, device)
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        token_nll = (token_nll * mask[:, 1:]).sum(1).double().cpu().tolist()
        for (i, w), value in zip(chunk, token_nll):
            nll[i] += value
            count[i] += len(w) - 1
    total, scored = sum(nll), sum(count)
    return {"gen_ppl": math.exp(total / scored) if scored else float("nan"),
            "nll_per_token": total / scored if scored else float("nan"), "tokens": scored,
            "sample_nll": [n / c if c else None for n, c in zip(nll, count)], "sample_tokens": count,
            "scorer": str(scorer), "scorer_dtype": dtype_name}


def unigram_entropy(token_ids: Sequence[int]) -> float:
    """Entropy (nats) of one sample's empirical token distribution; 0 for a constant or empty sequence."""
    n = len(token_ids)
    if n == 0:
        return 0.0
    return max(0.0, -sum(c / n * math.log(c / n) for c in Counter(token_ids).values()))


def mean_entropy(samples: Iterable[Sequence[int]]) -> float:
    """Mean unigram entropy over samples (the paper's entropy column)."""
    values = [unigram_entropy(s) for s in samples]
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def featurize(texts: Sequence[str], featurizer: str | Path, device: str = "cpu", max_len: int = 1024,
              batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """MAUVE features: the featuriser's final-layer hidden state at each text's last token (mauve-text's rule)."""
    device = torch.device(device)
    model, tok = _cached(featurizer, "featurizer", "text_eval.featurizer", False, device, torch.float32)
    max_len = min(max_len, _max_positions(model, tok))  # mauve-text's 1024 is GPT-2's context length
    # As mauve-text: empty strings dropped, tokenizer.encode with truncation to max_len, no padding at encode.
    encoded = [tok.encode(t, truncation=True, max_length=max_len) for t in texts if len(t) > 0]
    encoded = [e for e in encoded if e]
    if not encoded:
        raise ValueError("no non-empty texts to featurize")
    feats = []
    for b in tqdm(range(0, len(encoded), batch_size), desc="MAUVE features", disable=not progress):
        chunk = encoded[b:b + batch_size]
        tokens, mask = _padded(chunk, 0, device)
        out = model(input_ids=tokens, attention_mask=mask, output_hidden_states=True, return_dict=True)
        last = torch.tensor([len(e) - 1 for e in chunk], device=device)
        feats.append(out.hidden_states[-1][torch.arange(len(chunk), device=device), last].float().cpu())
    return torch.cat(feats).numpy()


def mauve_from_features(p_features: np.ndarray, q_features: np.ndarray, seed: int = MAUVE_SEED) -> float:
    """MAUVE of two feature sets with mauve-text's defaults (k-means on CPU, num_buckets 'auto' = n/10)."""
    try:
        import mauve  # lazy: only MAUVE needs it (and faiss, scikit-learn)
    except ImportError as e:
        raise ImportError(f"MAUVE needs the mauve-text package ({e}); install the eval extra: "
                          f"pip install -e '.[eval]' (mauve-text, faiss-cpu, scikit-learn)") from None
    out = mauve.compute_mauve(p_features=np.asarray(p_features), q_features=np.asarray(q_features),
                              num_buckets="auto", seed=seed, verbose=False, device_id=-1)
    return float(out.mauve)


def mauve_score(p_texts: Sequence[str], q_texts: Sequence[str], featurizer: str | Path, device: str = "cpu",
                max_len: int = 1024, batch_size: int = 8, seed: int = MAUVE_SEED, progress: bool = False) -> float:
    """MAUVE between p_texts (human text, by convention) and q_texts (model samples)."""
    p = featurize(p_texts, featurizer, device, max_len, batch_size, progress)
    q = featurize(q_texts, featurizer, device, max_len, batch_size, progress)
    return mauve_from_features(p, q, seed)
