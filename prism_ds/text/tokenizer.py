"""Tokenizer helpers for the text pipeline: load a (local) HF tokenizer and find its special ids."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from prism_ds.config import ConfigError, TextDataConfig
# Importing LLaDA registers model_type "llada", whose config AutoTokenizer reads from a LLaDA folder. LLADA_MASK
# lives with the model it belongs to (models.loading reads it too) and stays importable from here.
from prism_ds.models.llada import LLADA_MASK


def is_local_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("org/name" has one slash; paths start with . / ~ or exist)."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def load_tokenizer(cfg: TextDataConfig):
    """`AutoTokenizer.from_pretrained(cfg.tokenizer)`, with errors that name `text.tokenizer`."""
    name = cfg.tokenizer.strip()
    if not name:
        raise ConfigError("text.tokenizer: empty; set it to a tokenizer directory (or a hub name when online)")
    path = Path(name).expanduser()
    looks_local = is_local_path(name)
    if looks_local and not path.is_dir():
        raise ConfigError(f"text.tokenizer: directory {name!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path) if looks_local else name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"text.tokenizer: cannot load a tokenizer from {name!r}: {e}") from e


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(vocab_size, mask_id, eos_id); the mask is mask_token_id or LLaDA's '<|mdm_mask|>' token."""
    vocab_size = len(tokenizer)
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        mask_id = tokenizer.get_vocab().get(LLADA_MASK)
    if mask_id is None:
        raise ConfigError(f"text.tokenizer: the tokenizer has neither a mask_token nor a {LLADA_MASK!r} token; "
                          "a masked-diffusion LM needs one")
    if tokenizer.eos_token_id is None:
        raise ConfigError("text.tokenizer: the tokenizer has no eos_token (it ends and pads answers)")
    return vocab_size, int(mask_id), int(tokenizer.eos_token_id)


def encode_prompt(tokenizer, messages: list[dict], plain: str) -> list[int]:
    """Token ids of a prompt, the same in training and in sampling (one BOS, never an EOS).

    With a chat template, the template adds the model's own framing (LLaDA's puts BOS before the first
    message) and the text is tokenized without adding special tokens again; otherwise `plain` (the
    prompt through text.template) gets BOS by hand, since add_special_tokens may also append EOS/SEP.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return encode_plain(tokenizer, plain)


def encode_plain(tokenizer, plain: str) -> list[int]:
    """Token ids of an already templated prompt with one BOS in front (when the tokenizer has a BOS)."""
    ids = list(tokenizer(plain, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids
