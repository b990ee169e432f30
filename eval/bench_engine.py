"""Engine benchmark (CPU or GPU), side by side in one run:

1. steps/s of a PRISM step vs a pretraining (MDM-only) step on the same DiT and the same batches
   (a PRISM step is two backbone passes, so the expected ratio is about 2);
2. samples/s the prompt/solution pipeline delivers vs samples/s a PRISM training step consumes.

Data: MBPP (../shared/data/mbpp/mbpp.jsonl: text -> prompt, code -> solution) when present, else
synthetic rows; the tokenizer is a byte-level BPE trained here on that data with LLaDA's special tokens.

    .venv/bin/python eval/bench_engine.py [--steps 20] [--data FILE] [run-config overrides, e.g. model.hidden=256]

Prints a table and writes it to TensorBoard (runs/bench_engine/tb) and runs/bench_engine/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

if not __import__("torch").cuda.is_available():  # on a GPU host DeepSpeed's CUDA accelerator runs the engine
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from prism_ds.config import load_config  # noqa: E402
from prism_ds.core.objective import compute_losses  # noqa: E402
from prism_ds.engine import distributed as dist_utils  # noqa: E402
from prism_ds.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from prism_ds.models.prism_model import build_model  # noqa: E402
from prism_ds.text.prompt_data import PromptSolutionStream  # noqa: E402
from prism_ds.text.tokenizer import load_tokenizer, special_ids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]


def _rows(data: Path) -> list[dict]:
    """Prompt/solution rows from an MBPP-style JSONL (text, code); synthetic rows when the default MBPP is absent."""
    if not data.exists():
        if data != MBPP:
            raise SystemExit(f"--data {data}: file not found")
        print(f"[bench] {MBPP} not found: using synthetic rows")
        return [{"prompt": f"Write a function that returns {i} times x.",
                 "solution": f"def f(x):\n    return {i} * x\n"} for i in range(1000)]
    rows = []
    for n, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows.append({"prompt": r["text"], "solution": r["code"]})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{data}, line {n}: expected a JSON object with 'text' and 'code' ({e!r})") from None
    return rows


def _tokenizer(rows: list[dict], out: Path) -> str:
    """Train a small byte-level BPE on the rows, save it as an HF tokenizer with LLaDA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS, show_progress=False)
    core.train_from_iterator((r["prompt"] + "\n" + r["solution"] for r in rows), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                  additional_special_tokens=SPECIALS[2:])
    tok.save_pretrained(str(out))
    return str(out)


def _engine(cfg, stage: str, vocab_size: int, with_head: bool, state: dict | None):
    """A single-process DeepSpeed engine for `stage` (ZeRO-2, fp32 on CPU) with the given backbone weights."""
    import deepspeed

    s = getattr(cfg, stage)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.quality_head, vocab_size, with_head=with_head)
    if state is not None:
        model.backbone.load_state_dict(state)
    ds_config = dist_utils.build_ds_config(s, stage, 1)
    optimizer = build_optimizer(model, s, ds_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      lr_scheduler=build_scheduler(optimizer, s, stage), config=ds_config)
    return engine


def _step(engine, batch, mode: str, cfg, mask_id: int, gen: torch.Generator) -> None:
    # The pipeline's batches are CPU tensors; the engine may be on a GPU (as in training: Batch.to(device)).
    x, fixed, lengths = (t.to(engine.device) for t in (batch.x, batch.fixed, batch.answer_len.float()))
    losses = compute_losses(engine, x, fixed, mask_id, mode, cfg.masking, cfg.prism, lengths=lengths, generator=gen)
    engine.backward(losses.total)
    engine.step()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the table; returns the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode (after 3 warm-up steps)")
    ap.add_argument("--data", type=Path, default=MBPP, help="JSONL with text/code (MBPP) fields")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_engine")
    ap.add_argument("overrides", nargs="*", help="run-config overrides (defaults: sudoku_cpu model, batch 16, 256 tokens)")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = _rows(args.data)
    data_file = args.out / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok_dir = _tokenizer(rows, args.out / "tokenizer")
    cfg = load_config("sudoku_cpu", ["task=text", f"text.source={data_file}", f"text.tokenizer={tok_dir}",
                                     "text.max_length=256", "text.overlong=truncate", "pretrain.micro_batch_size=16",
                                     "finetune.micro_batch_size=16", *args.overrides])
    dist_utils.init_distributed()
    tokenizer = load_tokenizer(cfg.text)
    vocab_size, mask_id, _ = special_ids(tokenizer)
    mbs = cfg.finetune.micro_batch_size

    # 1. The pipeline alone (tokenise, template, pad, batch), in both padding modes.
    n_pipe, pipe_s, padding, batches = max(4 * args.steps, 50), {}, {}, []
    for mode in ("bucket", "eos"):  # the EOS-padded batches (fixed shape) are the ones trained on below
        stream = PromptSolutionStream(replace(cfg.text, padding=mode), tokenizer, mbs)
        batches, it = [], iter(stream)
        t0 = time.perf_counter()
        for _ in tqdm(range(n_pipe), desc=f"pipeline ({mode} padding)"):
            batches.append(next(it))
        pipe_s[mode] = time.perf_counter() - t0
        padding[mode] = stream.stats["pad_tokens"] / max(stream.stats["tokens"], 1)

    # 2. Pretrain vs PRISM steps on the same backbone and batches, interleaved so both see the same machine load.
    pre = _engine(cfg, "pretrain", vocab_size, with_head=False, state=None)
    prism = _engine(cfg, "finetune", vocab_size, with_head=True, state=pre.module.backbone.state_dict())
    times = {"pretrain": 0.0, "prism": 0.0}
    gen = torch.Generator(device=dist_utils.device()).manual_seed(0)  # masks are drawn where the engine runs
    for i in tqdm(range(args.steps + 3), desc="pretrain vs prism steps"):
        batch = batches[i % len(batches)]
        for mode, engine in (("pretrain", pre), ("prism", prism)):
            t = time.perf_counter()
            _step(engine, batch, mode, cfg, mask_id, gen)
            if i >= 3:  # warm-up steps are not timed
                times[mode] += time.perf_counter() - t

    res = {"device": str(dist_utils.device()), "torch_threads": torch.get_num_threads(),
           "params": sum(p.numel() for p in prism.module.parameters()), "micro_batch": mbs,
           "seq_len": cfg.text.max_length, "vocab": vocab_size, "rows": len(rows),
           "pretrain_steps_per_s": args.steps / times["pretrain"], "prism_steps_per_s": args.steps / times["prism"],
           "pipeline_samples_per_s": n_pipe * mbs / pipe_s["eos"],
           "pipeline_bucket_samples_per_s": n_pipe * mbs / pipe_s["bucket"],
           "padding_fraction_eos": padding["eos"], "padding_fraction_bucket": padding["bucket"],
           "truncated": stream.stats["truncated"]}
    res["prism_step_time_ratio"] = res["pretrain_steps_per_s"] / res["prism_steps_per_s"]
    res["prism_samples_per_s"] = res["prism_steps_per_s"] * mbs
    res["pipeline_over_training"] = res["pipeline_samples_per_s"] / res["prism_samples_per_s"]

    print(f"\nDiT {res['params'] / 1e6:.2f}M params, batch {mbs} x {res['seq_len']} tokens, {res['device']}, "
          f"{res['torch_threads']} threads, {res['rows']} rows")
    print(f"{'pretrain step':<34}{res['pretrain_steps_per_s']:9.2f} steps/s")
    print(f"{'PRISM step':<34}{res['prism_steps_per_s']:9.2f} steps/s")
    print(f"{'PRISM step time / pretrain':<34}{res['prism_step_time_ratio']:9.2f} x   (expected ~2: two passes)")
    print(f"{'pipeline, EOS padding':<34}{res['pipeline_samples_per_s']:9.1f} samples/s   "
          f"(padding {res['padding_fraction_eos']:.1%} of tokens)")
    print(f"{'pipeline, length buckets':<34}{res['pipeline_bucket_samples_per_s']:9.1f} samples/s   "
          f"(padding {res['padding_fraction_bucket']:.1%} of tokens)")
    print(f"{'PRISM training consumes':<34}{res['prism_samples_per_s']:9.1f} samples/s")
    print(f"{'pipeline / training':<34}{res['pipeline_over_training']:9.1f} x")

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(args.out / "tb")) as writer:
        for key, value in res.items():
            if isinstance(value, float):
                writer.add_scalar(f"bench/{key}", value, 0)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
