"""MDLM checkpoints (Sahoo et al. 2024) as prism-ds DiT backbones: the Hugging Face folder and the Lightning `.ckpt`.

    folder   config.json (model_type "mdlm": vocab_size, hidden_dim, cond_dim, n_blocks, n_heads, dropout,
             model_length, time_conditioning) + model.safetensors (or an index, or pytorch_model.bin),
             weights under `backbone.`, as published for kuleshov-group/mdlm-owt
    .ckpt    the authors' Lightning checkpoint: `state_dict` under `backbone.`, and its EMA weights
             (`ema.shadow_params`, a list in the backbone's parameters() order), used when present
The only name map is the `backbone.` prefix: prism-ds's DiT *is* MDLM's architecture (models/dit.py).
A `.ckpt` is a pickle: it is read with a restricted unpickler that only resolves the globals torch.save
writes for tensors and plain containers, and turns every other one (Lightning's and OmegaConf's objects,
or any function a crafted file names) into an inert placeholder, so no function named by the file is
called and neither package needs to be installed.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from prism_ds.models.dit import DiT
from prism_ds.models.weights import load_state_into, weight_map

PREFIX = "backbone."
# The only globals a checkpoint may name: what torch.save writes for tensors and containers. Anything else
# (Lightning's and OmegaConf's classes, and any callable a crafted file could name) becomes a placeholder.
_ALLOWED = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch.serialization", "_get_layout"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"), ("numpy", "ndarray"),
    *(("builtins", n) for n in ("set", "frozenset", "slice", "complex", "int", "float", "list", "dict", "tuple",
                                "bytearray", "bytes", "str", "bool")),
}
_STORAGE_SUFFIX = "Storage"  # torch.FloatStorage, torch.BFloat16Storage, ...
_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


@dataclass(frozen=True)
class MDLMDims:
    """The architecture a checkpoint was trained with."""

    vocab_size: int
    hidden: int
    n_blocks: int
    n_heads: int
    cond_dim: int
    length: int = 1024


class _Placeholder:
    """Stands in for any class the restricted unpickler does not build (e.g. an OmegaConf config)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = ((module, name) in _ALLOWED
                   or (module == "torch" and (name.endswith(_STORAGE_SUFFIX) or name in _DTYPES)))
        if allowed:
            return super().find_class(module, name)
        return type(name, (_Placeholder,), {"__module__": "prism_ds.models.mdlm.placeholder"})


class _restricted_pickle:  # torch.load's pickle_module protocol: Unpickler and load
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kw):
        return _RestrictedUnpickler(f, **kw).load()


def is_mdlm(path: str | Path) -> bool:
    """Whether `path` is an MDLM Lightning .ckpt or a folder whose config.json says model_type "mdlm"."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".ckpt"
    cfg = path / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "mdlm"


def _read_ckpt(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable Lightning checkpoint ({e})") from None


def _folder_dims(path: Path) -> MDLMDims:
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != "mdlm":
        raise ValueError(f"{path / 'config.json'}: model_type={raw.get('model_type')!r}, not an MDLM checkpoint "
                         f"(model.kind=mdlm loads kuleshov-group/mdlm-style folders)")
    if raw.get("time_conditioning"):
        raise ValueError(f"{path / 'config.json'}: time_conditioning=true is not supported (prism-ds's DiT, like "
                         f"the released OWT model, conditions on sigma = 0)")
    keys = ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"{path / 'config.json'}: missing {missing} (an MDLM config has {list(keys)})")
    return MDLMDims(int(raw["vocab_size"]), int(raw["hidden_dim"]), int(raw["n_blocks"]), int(raw["n_heads"]),
                    int(raw["cond_dim"]), int(raw.get("model_length", 1024)))


def _dims_from_state(state: dict[str, torch.Tensor], source: Path) -> MDLMDims:
    """The architecture from weight shapes (a .ckpt's config is an OmegaConf object we do not unpickle)."""
    try:
        vocab, hidden = state["vocab_embed.embedding"].shape
        cond_dim = state["sigma_map.mlp.0.weight"].shape[0]
        head_dim = 2 * state["rotary_emb.inv_freq"].shape[0]
    except KeyError as e:
        raise ValueError(f"{source}: no {PREFIX}{e.args[0]} weight: not an MDLM DiT checkpoint") from None
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return MDLMDims(int(vocab), int(hidden), n_blocks, int(hidden) // head_dim, int(cond_dim))


def _strip(state: dict, source: Path) -> dict[str, torch.Tensor]:
    out = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not out:
        raise ValueError(f"{source}: no weights under '{PREFIX}' (expected MDLM's DiT as `backbone`)")
    return out


def _folder_state(path: Path) -> dict[str, torch.Tensor]:
    if (path / "pytorch_model.bin").exists() and not (path / "model.safetensors").exists():
        return _strip(torch.load(str(path / "pytorch_model.bin"), map_location="cpu", weights_only=True), path)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map(path).values())):
        state.update(load_file(str(path / file)))
    return _strip(state, path)


def _ema_state(ckpt: dict, state: dict[str, torch.Tensor], dims: MDLMDims, source: Path) -> dict[str, torch.Tensor]:
    """The EMA weights in place of the trained ones: shadow_params follow the backbone's parameters() order."""
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not shadow:
        return state
    with torch.device("meta"):
        names = [n for n, _ in _build(dims).named_parameters()]
    if len(shadow) != len(names):
        raise ValueError(f"{source}: {len(shadow)} EMA weights but the DiT has {len(names)} parameters")
    out = dict(state)
    for name, value in zip(names, shadow):
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(f"{source}: EMA weight for {name} has shape {tuple(value.shape)}, expected "
                             f"{tuple(state[name].shape)}")
        out[name] = value
    return out


def _build(dims: MDLMDims, **kw) -> DiT:
    return DiT(dims.vocab_size, dims.hidden, dims.n_blocks, dims.n_heads, dims.cond_dim, **kw)


def read_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], MDLMDims]:
    """(DiT state dict, dimensions) of an MDLM folder or .ckpt, names checked against the architecture."""
    path = Path(path).expanduser()
    if path.is_file():
        ckpt = _read_ckpt(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"{path}: no 'state_dict' (expected an MDLM Lightning checkpoint)")
        state = _strip(ckpt["state_dict"], path)
        dims = _dims_from_state(state, path)
        if use_ema:
            state = _ema_state(ckpt, state, dims, path)
    elif path.is_dir():
        dims, state = _folder_dims(path), _folder_state(path)
    else:
        raise FileNotFoundError(f"model.path={str(path)!r}: neither an MDLM folder nor a .ckpt file")
    check_names(state, dims, path)
    return state, dims


def check_names(state: dict[str, torch.Tensor], dims: MDLMDims, source: Path) -> None:
    """Every weight the DiT needs is present with its shape, and nothing else is; errors name the keys."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in _build(dims).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match MDLM's DiT (missing {[PREFIX + k for k in missing[:5]]}, "
                         f"unexpected {[PREFIX + k for k in unexpected[:5]]})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{source}: {PREFIX}{name} has shape {tuple(state[name].shape)}, but the config "
                             f"implies {shape}")


@lru_cache(maxsize=8)
def dims_of(path: str) -> MDLMDims:
    """The architecture of an MDLM folder (from config.json) or .ckpt (from its weight shapes)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _folder_dims(p)
    return read_checkpoint(p, use_ema=False)[1]


def vocab_and_mask(path: str | Path, tokenizer) -> tuple[int, int]:
    """(embedding rows, mask id) of an MDLM checkpoint, checked against the tokenizer.

    MDLM appends its mask token after the tokenizer's vocabulary (GPT-2: 50257 tokens, mask 50257).
    """
    vocab = dims_of(str(path)).vocab_size
    mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else len(tokenizer)
    if mask != vocab - 1 or len(tokenizer) not in (vocab - 1, vocab):
        raise ValueError(f"text.tokenizer: {len(tokenizer)} tokens (mask id {mask}), but the checkpoint {path} "
                         f"embeds {vocab} rows with the mask as the last one: tokenizer and checkpoint do not "
                         f"match (mdlm-owt uses the GPT-2 tokenizer)")
    return vocab, mask


def load_into(backbone: torch.nn.Module, path: str | Path, use_ema: bool = True) -> None:
    """Copy an MDLM checkpoint's weights into a DiT (ZeRO-3 partitions included)."""
    state, _ = read_checkpoint(path, use_ema)
    load_state_into(backbone, state, str(path))
