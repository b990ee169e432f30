"""The GPU dtype path, run on CPU: the flagship trains LLaDA in bf16 under DeepSpeed ZeRO-3 and samples in bf16.

DeepSpeed's CPU accelerator trains bf16 (gloo), so with model.dtype=bfloat16 a tiny LLaDA goes through the same
precision path as the 8B run: a PRISM fine-tune (LoRA + projection+linear head) under ZeRO-3 in bf16, its export
reloaded in bf16, and the blockwise sampler (cache none / prefix / dual, threshold decoding) in bf16, checked pass
by pass against fp32 from the same weights.
"""
import copy
import json
import math

import pytest
import torch

import prism_ds
import prism_ds.engine.trainer as trainer
from helpers import read_scalars
from prism_ds.config import ConfigError, StageConfig, load_config, to_dict
from prism_ds.core.sampler import SamplerSettings, sample
from prism_ds.core.schedules import BlockwiseSchedule
from prism_ds.engine.distributed import build_ds_config, uses_cuda
from prism_ds.engine.resume import config_diff
from prism_ds.models.prism_model import PrismOutput
from prism_ds.models.tiny_llada import MASK_ID

EOS_ID = 126081


def _probe() -> torch.Tensor:
    x = torch.randint(0, 2000, (2, 40), generator=torch.Generator().manual_seed(5))
    x[1, -6:] = MASK_ID  # a masked tail: the unmasking logits matter there
    return x


@pytest.fixture(scope="module")
def bf16_run(tiny_llada, tmp_path_factory):
    """(export, what the run saw): a 3-step PRISM fine-tune of the tiny LLaDA with model.dtype=bfloat16 on CPU."""
    import deepspeed

    data = tiny_llada.parent / "data"
    over = {"run_dir": str(tmp_path_factory.mktemp("bf16") / "run"), "model.path": str(tiny_llada),
            "model.dtype": "bfloat16", "text.source": str(data / "train.jsonl"),
            "text.heldout_source": str(data / "heldout.jsonl"), "text.max_length": 96, "finetune.steps": 3,
            "finetune.log_every": 1, "finetune.calib_every": 3, "finetune.ckpt_every": 3, "lora.r": 4,
            "lora.alpha": 8}
    cfg = load_config("llada_tiny", [f"{k}={v}" for k, v in over.items()])
    seen = {"losses": [], "quality_dtype": set()}
    real_init, real_losses, real_export = deepspeed.initialize, trainer.compute_losses, trainer.export_trainable

    def init_spy(*args, **kwargs):
        out = real_init(*args, **kwargs)
        engine = out[0]
        seen["bf16_enabled"] = engine.bfloat16_enabled()
        seen["param_dtypes"] = {n: p.dtype for n, p in engine.module.named_parameters()}
        return out

    def losses_spy(*args, **kwargs):
        out = real_losses(*args, **kwargs)
        seen["losses"].append((out.total.item(), out.mdm.item(), out.prism.item()))
        seen["quality_dtype"].add(out.quality.dtype)  # what the head computed in, inside the engine
        return out

    def export_spy(model, *args, **kwargs):  # the engine's module after the last step
        model.eval()
        with torch.no_grad():
            out = model(_probe())
        seen["logits"], seen["quality"] = out.logits.clone(), out.quality.clone()
        model.train()
        return real_export(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deepspeed, "initialize", init_spy)
        mp.setattr(trainer, "compute_losses", losses_spy)
        mp.setattr(trainer, "export_trainable", export_spy)
        final = trainer.train(cfg, "finetune", progress=False)
    return final, seen


def test_model_dtype_and_the_ds_config_follow_one_rule(tmp_path):
    """auto keeps CPU ranks in fp32; float32 turns bf16 off; bfloat16 keeps it on, even on CPU; a contradiction
    between model.dtype and the DS config is an error naming both."""
    stage = StageConfig(ds_config="zero3.json")
    bf16 = lambda dtype: build_ds_config(stage, "finetune", 1, dtype)["bf16"]["enabled"]  # noqa: E731
    assert bf16("auto") is uses_cuda()  # every existing CPU run stays fp32
    assert bf16("float32") is False
    assert bf16("bfloat16") is True
    assert build_ds_config(stage, "finetune", 1)["bf16"]["enabled"] is uses_cuda()  # default: auto
    plain = tmp_path / "fp32.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    stage.ds_config = str(plain)
    with pytest.raises(ConfigError, match=r"model\.dtype=bfloat16 contradicts finetune\.ds_config=.*fp32\.json "
                                          r"\(neither bf16 nor fp16 enabled\); enable \"bf16\""):
        build_ds_config(stage, "finetune", 1, "bfloat16")
    plain.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"model\.dtype=bfloat16 contradicts .*\(\"fp16\" enabled\)"):
        build_ds_config(stage, "finetune", 1, "bfloat16")
    with pytest.raises(ConfigError, match=r"model\.dtype='half': expected auto, float32, bfloat16 or float16"):
        build_ds_config(stage, "finetune", 1, "half")
    # It changes what a stage trains, so a finished or checkpointed stage is not reused across a change to it.
    auto, low = (to_dict(load_config("llada_tiny", [f"model.dtype={d}"])) for d in ("auto", "bfloat16"))
    assert config_diff(auto, low, "finetune") == ["model.dtype: 'auto' -> 'bfloat16'"]


def test_zero3_prism_finetune_trains_in_bf16_on_cpu(bf16_run):
    final, seen = bf16_run
    assert seen["bf16_enabled"]
    dtypes = seen["param_dtypes"]
    lora = {n for n in dtypes if "lora_" in n}
    head = {n for n in dtypes if n.startswith("quality_head.")}
    assert len(lora) == 2 * 3 * 2 and len(head) == 6  # 2 layers x q/k/v x A/B; LayerNorm, Linear, Linear
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    assert seen["quality_dtype"] == {torch.bfloat16}
    # 3 training steps, then the held-out chunks (the same compute_losses, in eval mode)
    assert len(seen["losses"]) > 3 and all(math.isfinite(v) for step in seen["losses"] for v in step)
    scalars = read_scalars(final.parent / "tb")
    for tag in ("loss/prism", "loss/mdm", "grad_norm", "calibration/bce"):
        assert all(math.isfinite(v) for v in scalars[tag]), (tag, scalars[tag])
    assert seen["logits"].dtype == seen["quality"].dtype == torch.bfloat16


def test_the_bf16_export_reloads_in_bf16_and_reproduces_the_engine(bf16_run):
    final, seen = bf16_run
    model, cfg = prism_ds.load_model(final)
    assert cfg.model.dtype == "bfloat16"
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert any("lora_" in n for n in dtypes) and any(n.startswith("quality_head.") for n in dtypes)
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    with torch.no_grad():
        out = model(_probe())
    assert out.logits.dtype == out.quality.dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.quality).all()
    # The same bf16 computation as the engine's (the export holds its bf16 weights, upcast losslessly).
    assert torch.equal(out.logits, seen["logits"]) and torch.equal(out.quality, seen["quality"])
    merged, _ = prism_ds.load_model(final, merge_adapter=True)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        fast = merged(_probe())
    scale = out.logits.float().abs().max()
    assert (fast.logits.float() - out.logits.float()).abs().max() <= 0.02 * scale  # merging rounds to bf16


class _PairCache:
    """The bf16 model's and the fp32 model's KV caches, sliced together (the sampler keeps one cache object)."""

    def __init__(self, low, ref):
        self.low, self.ref = low, ref

    def rows(self, index: torch.Tensor) -> "_PairCache":
        return _PairCache(self.low.rows(index), self.ref.rows(index))


def _relative_error(low: torch.Tensor, ref: torch.Tensor) -> float:
    """max |low - ref| as a fraction of max |ref|."""
    return ((low.float() - ref).abs().max() / ref.abs().max()).item()


class _Shadowed(torch.nn.Module):
    """Samples with `low` (bf16); every pass is also run by `ref` (fp32, the same weights) on the same inputs,
    with its own cache, and compared: the comparison follows one trajectory, so a near-tie that flips one token
    cannot make every later pass differ. Per pass: (cached?, dtypes, logits error, quality error, argmax agreement)."""

    supports_kv_cache = True

    def __init__(self, low, ref, allowed: torch.Tensor):
        super().__init__()
        self.low, self.ref, self.quality_head, self.allowed, self.passes = low, ref, low.quality_head, allowed, []

    def forward(self, tokens, kv_cache: _PairCache | None = None, **kwargs) -> PrismOutput:
        low = self.low(tokens, **kwargs, **({} if kv_cache is None else {"kv_cache": kv_cache.low}))
        ref = self.ref(tokens, **kwargs, **({} if kv_cache is None else {"kv_cache": kv_cache.ref}))
        propose = lambda lg: lg.float().masked_fill(~self.allowed, float("-inf")).argmax(-1)  # noqa: E731
        self.passes.append(dict(
            cached=kwargs.get("fresh") is not None, dtypes=(low.logits.dtype, ref.logits.dtype),
            logits=_relative_error(low.logits, ref.logits),
            quality=None if low.quality is None else _relative_error(low.quality, ref.quality),
            agree=(propose(low.logits) == propose(ref.logits)).float().mean().item()))
        both = None if low.kv_cache is None else _PairCache(low.kv_cache, ref.kv_cache)
        return PrismOutput(logits=low.logits, quality=low.quality, kv_cache=both)


@pytest.fixture(scope="module")
def sampling_models(bf16_run):
    """(bf16 model, fp32 model) with identical weights: the reloaded export, made confident and its head varied."""
    low, _ = prism_ds.load_model(bf16_run[0])
    with torch.no_grad():
        torch.manual_seed(1)
        # After 3 steps the head's zero-init output layer is still ~0 (quality ~ constant, remasking a tie-break)
        # and the random backbone's top probability ~1e-5 (a threshold never fires): spread both.
        low.quality_head.net[-1].weight.normal_()
        low.backbone.model.base_model.model.model.transformer.ff_out.weight.mul_(40)
    return low, copy.deepcopy(low).float()  # bf16 values are exact in fp32


@pytest.mark.parametrize("cache, threshold", [("none", None), ("prefix", None), ("dual", None), ("dual", 0.5),
                                              ("none", 0.5)])
def test_blockwise_sampling_in_bf16_follows_fp32_pass_by_pass(sampling_models, cache, threshold):
    """code-eval's sampler (left-padded prompts, allowed ids, PRISM remasking) in bf16, each pass checked."""
    low, ref = sampling_models
    prompt, gen, block = 12, 64, 32
    tokens = torch.cat([torch.randint(0, 2000, (3, prompt), generator=torch.Generator().manual_seed(3)),
                        torch.full((3, gen), MASK_ID)], 1)
    attention = torch.ones_like(tokens)
    tokens[2, :4], attention[2, :4] = EOS_ID, 0  # a shorter prompt, left-padded as code-eval batches them
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, :prompt] = True
    allowed = torch.arange(126464) < 126349  # the tokenizer's ids, as code-eval allows them
    model = _Shadowed(low, ref, allowed)
    settings = SamplerSettings(MASK_ID, 8, BlockwiseSchedule(block, 2, gen_length=gen), policy="prism",
                               unmask_order="confidence", temperature=0.0, allowed_tokens=allowed, eos_id=EOS_ID,
                               cache=cache, threshold=threshold)
    out = sample(model, tokens, fixed, settings, attention_mask=attention, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :prompt], tokens[:, :prompt]) and (out != MASK_ID).all() and allowed[out].all()
    passes = model.passes
    assert {p["cached"] for p in passes} == ({False} if cache == "none" else {False, True})  # cached passes too
    assert all(p["dtypes"] == (torch.bfloat16, torch.float32) for p in passes)
    # bf16 keeps 8 bits of mantissa; measured here: logits within 0.8% of their largest value, quality within
    # 4% (a cached pass scores a 32-position slice, so its own largest value is a small sample).
    worst = max(p["logits"] for p in passes)
    assert worst <= 0.03, f"bf16 logits differ from fp32 by {worst:.1%} of their largest value"
    worst = max(p["quality"] for p in passes if p["quality"] is not None)
    assert worst <= 0.1, f"bf16 quality differs from fp32 by {worst:.1%} of its largest value"
    # Tokens flip only at near-ties of the fp32 logits (95-98% of the proposals agree here).
    agree = sum(p["agree"] for p in passes) / len(passes)
    assert agree >= 0.9, f"only {agree:.1%} of the argmax proposals agree"
