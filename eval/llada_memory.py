"""Estimated GPU memory per GPU for LLaDA-8B LoRA PRISM fine-tuning under DeepSpeed ZeRO-3 (an estimate, not a measurement).

Usage: .venv/bin/python eval/llada_memory.py [--seq 1024] [--micro-batch 1] [--lora-r 256] [--n-y 1]
Prints Markdown (the text of eval/llada_memory.md). Needs no GPU: arithmetic plus DeepSpeed's own
ZeRO-3 estimator (deepspeed.runtime.zero.stage3), which covers full fine-tuning only, so it is shown
as a reference. One PRISM step = two backbone passes with gradients per sample: z (all positions +
vocabulary logits for the MDM loss) and y (n_y rows per sample, no vocabulary projection, quality head).
"""
from __future__ import annotations

import argparse
import contextlib
import io

with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed logs "Setting accelerator to CPU" to stdout
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

GiB = 2**30
D, LAYERS, HEADS, FF, VOCAB = 4096, 32, 32, 12288, 126464  # LLaDA-8B-Instruct config.json
EMBED = VOCAB * D  # wte and the untied output ff_out: the largest layers (517,996,544 params each)
BASE = 2 * EMBED + LAYERS * (4 * D * D + 3 * D * FF + 2 * D) + D  # + ln_f
assert BASE == 8_015_581_184
HEAD = 2 * D + D * D + D + D + 1  # quality head: LayerNorm(4096) -> Linear(4096,4096) -> GELU -> Linear(4096,1)
# The installed DeepSpeed's ZeRO-3 defaults (deepspeed/runtime/zero/config.py); ds_configs/zero3*.json keep them.
_Z = DeepSpeedZeroConfig.model_fields
MAX_LIVE = int(_Z["max_live_parameters"].default)  # stage3_max_live_parameters = 1e9 gathered params -> 2 GB bf16
REDUCE_BUCKET = int(_Z["reduce_bucket_size"].default)  # 5e8: contiguous_gradients allocates a bf16 bucket on GPU
PREFETCH = int(_Z["prefetch_bucket_size"].default)  # 5e7, inside the max-live bound
OVERHEAD = 2.0 * GiB  # assumed: CUDA context (~0.6-1 GiB) + NCCL buffers + caching-allocator fragmentation
CARDS = {"24 GB": 22.5 * GiB, "80 GB": 79.0 * GiB}  # usable memory torch reports (L4/A10/4090; A100/H100)


def lora_params(r: int) -> int:
    """LoRA A (r x 4096) + B (4096 x r) on q_proj, k_proj, v_proj of every block."""
    return LAYERS * 3 * 2 * r * D


def block_act_bytes(r: int) -> int:
    """Bytes one LLaDA block saves for backward per token (bf16 run, LoRA on q/k/v, flash/mem-efficient SDPA).

    Autograd saves a matmul input only when the weight needs a gradient, so the bf16 outputs of the two
    RMSNorms, the SwiGLU product and attn_out's input (all consumed only by frozen Linears) are NOT kept.
    Checked with torch.autograd.graph.saved_tensors_hooks on one 4096-wide block on CPU: 190,088 B/token,
    i.e. this count + 3 * D because CPU dropout keeps bf16 masks where CUDA keeps bool (1 byte) masks.
    """
    norms = 2 * (4 * D + 4)  # attn_norm, ff_norm: fp32 copy of the block/residual input (x.float()) + rsqrt
    lora = 3 * (2 * D + D + 2 * r)  # per q/k/v: dropout output (bf16), dropout mask (bool), lora_A output (bf16)
    attn = 4 * 2 * D + 4 * HEADS  # RoPE'd q, k, v and attention output (bf16) + fp32 logsumexp per head (O(L))
    mlp = 3 * 2 * FF  # SwiGLU: gate (silu input), silu output, up_proj output (bf16); product not kept
    return norms + lora + attn + mlp


def activations(mb: int, seq: int, n_y: int, r: int, ckpt: bool) -> float:
    """Peak activation bytes per GPU for one micro batch (both passes held until backward)."""
    t1, t2 = mb * seq, mb * n_y * seq  # tokens of pass 1 (z) and pass 2 (y)
    blk = block_act_bytes(r)
    if ckpt:  # per-block checkpointing: keep each block's bf16 input; recompute one block + its backward grads
        layers = LAYERS * 2 * D * (t1 + t2) + 2 * blk * max(t1, t2)
    else:  # everything saved in all 32 blocks of both passes + one block's backward working set
        layers = LAYERS * blk * (t1 + t2) + blk * max(t1, t2)
    outside = (4 * D + 4) * (t1 + t2) + (4 * 2 * D + 8) * t2  # ln_f fp32 copy; quality head (pass 2)
    # Pass-1 logits: bf16 [mb, L, V] + the fp32 copy mdm_loss makes (logits.float()) + fp32 log-softmax
    # that cross_entropy saves = 2 + 4 + 4 bytes per vocabulary entry (1.24 GiB per 1024-token sample).
    logits = (2 + 4 + 4) * VOCAB * t1
    return layers + outside + logits


def model_states(n_gpus: int, offload: bool, trainable: int) -> float:
    """ZeRO-3 model states per GPU for the frozen bf16 base + the trainable LoRA/head parameters.

    Frozen: bf16 weight only, 2 B/param / N. Trainable: bf16 param 2 + bf16 grad partition 2 (DeepSpeed's
    gradient_accumulation_dtype follows the bf16 model dtype) + fp32 master 4 + Adam m 4 + v 4 = 16 B/param / N.
    (The fp32 grad copy DeepSpeed makes per sub-group at optimizer.step, 4 B/param / N, comes after the
    activations are freed, so it does not raise the peak.) Always on GPU: the gathered-parameter working set
    (stage3_max_live_parameters in bf16, an upper bound) and the bf16 reduce bucket. With offload_param +
    offload_optimizer the partitions, grads and Adam states live in CPU RAM.
    """
    on_gpu = 2 * MAX_LIVE + 2 * REDUCE_BUCKET
    return on_gpu if offload else on_gpu + (2 * BASE + 16 * trainable) / n_gpus


def estimated_total(n_gpus: int, mb: int, seq: int, n_y: int, r: int, ckpt: bool, offload: bool = False) -> float:
    """Estimated peak bytes per GPU: model states + activations + the CUDA context and allocator overhead."""
    trainable = lora_params(r) + HEAD
    return model_states(n_gpus, offload, trainable) + activations(mb, seq, n_y, r, ckpt) + OVERHEAD


def cpu_offload_per_node(trainable: int, nodes: int) -> float:
    """CPU RAM per node for offload: bf16 base 2 B/param + trainable 2+2+12 (+4 fp32 grad at step) B/param."""
    return (2 * BASE + 20 * trainable) / nodes


def verdict(total: float, cap: float) -> str:
    """yes (<= 85% of usable), tight (85-100%), no."""
    return "yes" if total <= 0.85 * cap else "tight" if total <= cap else "no"


def gib(b: float) -> str:
    return f"{b / GiB:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=256)
    ap.add_argument("--n-y", type=int, default=1, help="y rows per sample in pass 2 (prism.n_y)")
    a = ap.parse_args()
    trainable = lora_params(a.lora_r) + HEAD
    setups = [(1, 1), (8, 1), (8, 2)]  # (GPUs per node, nodes): 1 GPU, 1 node x 8, 2 nodes x 8

    print("## Estimated GPU memory: LLaDA-8B LoRA PRISM fine-tuning, ZeRO-3 (estimate, not a measurement)\n")
    print(f"seq {a.seq}, micro batch {a.micro_batch} per GPU, n_y {a.n_y}, LoRA r={a.lora_r} on q/k/v of "
          f"{LAYERS} layers ({lora_params(a.lora_r) / 1e6:.1f}M) + quality head ({HEAD / 1e6:.1f}M) = "
          f"{trainable / 1e6:.1f}M trainable; frozen base {BASE:,} params (bf16). GiB = 2^30 bytes.\n")
    print("| GPUs | act. ckpt | ZeRO-3 offload | model states/GPU | activations/GPU | CUDA ctx+alloc | "
          "total/GPU | fits 24 GB? | fits 80 GB? |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows: dict[tuple[int, bool, bool], float] = {}
    for g, nodes in setups:
        n = g * nodes
        for offload in (False, True):
            for ckpt in (False, True):
                ms, act = model_states(n, offload, trainable), activations(a.micro_batch, a.seq, a.n_y, a.lora_r, ckpt)
                rows[n, ckpt, offload] = total = estimated_total(n, a.micro_batch, a.seq, a.n_y, a.lora_r, ckpt,
                                                                 offload)
                print(f"| {n} | {'yes' if ckpt else 'no'} | {'params+optimizer' if offload else 'no'} | {gib(ms)} | "
                      f"{gib(act)} | {gib(OVERHEAD)} | **{gib(total)}** | {verdict(total, CARDS['24 GB'])} | "
                      f"{verdict(total, CARDS['80 GB'])} |")
    for g, nodes in setups:  # DeepSpeed's own estimator: full fine-tuning (all params trainable), model states only
        for offload in (False, True):
            _, gpu, _ = estimate_zero3_model_states_mem_needs(BASE, EMBED, g, nodes, cpu_offload=offload,
                                                              cpu_offload_params=offload, zero_init=True)
            print(f"| {g * nodes} | ref: DeepSpeed estimate, FULL fine-tuning | {'params+optimizer' if offload else 'no'}"
                  f" | {gib(gpu)} | (not included) | - | {gib(gpu)} + act. | - | - |")

    print("\n### How to fit\n")
    order = [(False, False), (True, False), (False, True), (True, True)]  # cheapest in speed first
    for card, cap in CARDS.items():
        picks = []
        for g, nodes in setups:
            n = g * nodes
            ok = [(c, o) for c, o in order if verdict(rows[n, c, o], cap) == "yes"]
            if ok:
                c, o = ok[0]
                pick = f"act. ckpt {'on' if c else 'off'}, offload {'on' if o else 'off'} ({gib(rows[n, c, o])} GiB)"
            else:
                pick = "does not fit"
            picks.append(f"{n} GPU{'s' if n > 1 else ''}: {pick}")
        print(f"- **{card} cards** (fastest option with >= 15% headroom): " + "; ".join(picks) + ".")
    per_sample = [activations(2, a.seq, a.n_y, a.lora_r, c) - activations(1, a.seq, a.n_y, a.lora_r, c)
                  for c in (False, True)]
    print(f"- Each extra sample in the micro batch adds {gib(per_sample[0])} GiB (no ckpt) / "
          f"{gib(per_sample[1])} GiB (ckpt) per GPU; raise throughput with gradient accumulation instead.")
    print(f"- ZeRO-3 offload CPU RAM per node (bf16 base {2 * BASE / GiB:.1f} GiB + trainable states "
          f"{20 * trainable / GiB:.1f} GiB, split over nodes): 1 node {gib(cpu_offload_per_node(trainable, 1))} GiB, "
          f"2 nodes {gib(cpu_offload_per_node(trainable, 2))} GiB each; x1.5 buffer as DeepSpeed's estimator: "
          f"{gib(1.5 * cpu_offload_per_node(trainable, 1))} / {gib(1.5 * cpu_offload_per_node(trainable, 2))} GiB. "
          f"Load under zero.Init (from_pretrained with DeepSpeed ZeRO-3 active), else every rank first holds a "
          f"full {2 * BASE / GiB:.0f} GiB bf16 copy ({8 * 2 * BASE / GiB:.0f} GiB on an 8-GPU node).")
    print("- Offload moves the whole bf16 base over PCIe for every pass (z, y, backward, recompute): "
          "expect it to be several times slower; use it only where the card cannot hold the partitions.")

    print("\n### Assumptions\n")
    for line in [
        (f"Model states: frozen base 2 B/param / N; trainable 16 B/param / N (bf16 param + bf16 grad + fp32 master"
         f" + 2 fp32 Adam moments); plus on every GPU the gathered-parameter working set, bounded by DeepSpeed's"
         f" default stage3_max_live_parameters = {MAX_LIVE:.0e} params ({gib(2 * MAX_LIVE)} GiB bf16; prefetch"
         f" bucket {PREFETCH:.0e} is inside it), and the reduce bucket, reduce_bucket_size = {REDUCE_BUCKET:.0e}"
         f" bf16 ({gib(2 * REDUCE_BUCKET)} GiB). DeepSpeed's estimator assumes every param trainable (18 B/param"
         f" / N + 4 B x largest layer {EMBED:,}): {18 * BASE / GiB:.0f} GiB of states to partition vs"
         f" {(2 * BASE + 16 * trainable) / GiB:.1f} GiB here, because the {BASE / 1e9:.1f}B frozen params carry"
         f" no grads or Adam states."),
        (f"Activations per token per block: {block_act_bytes(a.lora_r):,} B (see block_act_bytes), x {LAYERS}"
         f" blocks x tokens x 2 passes without checkpointing; with per-block checkpointing {2 * D:,} B per block"
         f" per token per pass plus one block recomputed and its backward working set. Pass-1 logits"
         f" {gib(10 * VOCAB * a.seq)} GiB per sample (bf16 + fp32 copy + fp32 log-softmax, 10 B x {VOCAB});"
         f" y_positions=confidence adds a transient fp32 softmax (+8 B x vocab per token)."),
        ("Flash/mem-efficient attention (no L x L scores; a padding mask also stays on an O(L) kernel);"
         " LoRA weights assumed bf16 under DeepSpeed bf16 (fp32 adapters would add 2 B x 4096 x 3 per token/block)."),
        (f"{gib(OVERHEAD)} GiB CUDA context + NCCL + allocator fragmentation; usable card memory"
         f" {gib(CARDS['24 GB'])} / {gib(CARDS['80 GB'])} GiB; 'tight' = above 85% of it."),
    ]:
        print(f"- {line}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_cold(total_params=BASE, largest_layer_params=EMBED,
                                                       num_gpus_per_node=8, num_nodes=1)
    print("\nDeepSpeed `estimate_zero3_model_states_mem_needs_all_cold` for the 8B model, 1 node x 8 GPUs "
          "(FULL fine-tuning, model states only; its 'GB' = GiB):\n\n```\n" + out.getvalue().rstrip() + "\n```")


if __name__ == "__main__":
    main()
