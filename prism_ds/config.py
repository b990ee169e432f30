"""Typed run configuration: dataclasses loaded from YAML recipes with dotted command-line overrides.

    cfg = load_config("sudoku_6x6_cpu", ["model.hidden=256", "finetune.steps=100"])

Unknown keys and ill-typed values raise ConfigError naming the file (or override) and the key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names where it came from."""


@dataclass
class ModelConfig:
    """The backbone: prism-ds's DiT (sizes below; vocabulary and length come from the data), an MDLM
    checkpoint loaded into it (`kind: mdlm`: a kuleshov-group/mdlm-owt folder or a Lightning .ckpt at
    `path`; sizes from the checkpoint), or a pretrained Hugging Face folder (`kind: llada`, or `hf` for any
    MDM with its own remote code)."""

    kind: str = "dit"  # dit | mdlm | llada | hf
    hidden: int = 128
    n_blocks: int = 4
    n_heads: int = 4
    cond_dim: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0
    path: str = ""  # mdlm / llada / hf: the pretrained folder (config.json, weights, tokenizer files); mdlm: or a .ckpt
    use_ema: bool = True  # mdlm .ckpt: load its EMA weights when it has them
    # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16: llada / hf load in it, and every kind trains in it
    # (engine/distributed.py makes the ds_config agree: bfloat16 trains bf16 on CPU too)
    dtype: str = "auto"
    attention: str = "sdpa"  # sdpa | flash (flash-attn on GPU in bf16 for unpadded batches, else SDPA)
    gradient_checkpointing: bool = False  # recompute each block in backward (activation checkpointing)
    trust_remote_code: bool = False  # hf: run the folder's own modeling code


@dataclass
class LoraConfig:
    """peft LoRA adapters on the backbone (r = 0: none); the base weights stay frozen."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


@dataclass
class QualityHeadConfig:
    """Which quality head to attach for PRISM fine-tuning."""

    kind: str = "linear"


@dataclass
class MaskingConfig:
    """Masking process: mask probability (1 - eps) * t with t ~ U(eps, 1) per sample."""

    eps: float = 1e-3
    antithetic: bool = True


@dataclass
class PrismConfig:
    """y-construction and loss weighting (Algorithm 1, appendix D.3/D.4)."""

    k: int = 4
    n_y: int = 1
    y_positions: str = "random"  # random | confidence
    nucleus_p: float = 1.0
    temperature: float = 1.0  # 0 fills y with argmax tokens
    lam: float = 5.0
    y_window: int = 0  # > 0: y positions only among the first y_window maskable positions (LLaDA run: 512)
    # > 0: only the first mask_window answer positions may be masked; later answer and EOS-pad positions are always
    # clean context (the authors' LLaDA run: 512), and the MDM normaliser is each sample's maskable count.
    mask_window: int = 0


@dataclass
class StageConfig:
    """One training stage (pretraining or PRISM fine-tuning) and its DeepSpeed/optimizer settings."""

    steps: int = 1000
    micro_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-4  # backbone (or its LoRA adapters)
    head_lr: float = 0.0  # quality head; 0 = lr (a prism-ds option, not from the paper)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # fraction of steps; use this or warmup_steps, not both
    lr_schedule: str = "constant_with_warmup"  # any transformers.get_scheduler name
    # num_cycles of the cosine schedules; 0 = the schedule's own default (cosine: 0.5, a half period down to 0;
    # cosine_with_restarts: 1). The authors' LLaDA run: cosine with 5 (five full periods, ending at the peak).
    lr_cycles: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA
    freeze_backbone: bool = False
    ds_config: str = "zero2.json"  # a file in ds_configs/ or any path
    log_every: int = 20
    calib_every: int = 100  # quality-head calibration (ECE, reliability diagram, AUROC) on held-out data
    ckpt_every: int = 200  # DeepSpeed checkpoint (model, optimizer, schedule, data position, RNG)
    keep_last: int = 2  # DeepSpeed checkpoints kept; older ones are deleted
    resume: bool = True  # continue from the stage's latest DeepSpeed checkpoint when there is one
    peak_tflops: float = 0.0  # per-GPU peak for the MFU estimate; 0 = look up the GPU name
    init_from: str = ""  # checkpoint dir; empty = the pretrain stage's final checkpoint (finetune only)
    # (critic: the export whose backbone is the frozen f_theta; empty = the finetune stage's final checkpoint)


@dataclass
class CriticStageConfig(StageConfig):
    """The Token-Critic baseline's critic stage (`train --stage critic`); steps 0 = the run has none.

    Its own class so that setting any critic.* key leaves steps at 0 unless steps itself is set."""

    steps: int = 0


@dataclass
class SudokuDataConfig:
    """Board geometry, training data and evaluation puzzles."""

    box_rows: int = 2
    box_cols: int = 3
    train_csv: str = ""  # empty = generate n_train solved boards into the run dir
    n_train: int = 20000
    eval_csv: str = ""  # empty = generate n_eval puzzles into the run dir
    n_eval: int = 500
    blanks: int = 22
    seed: int = 0


@dataclass
class TextDataConfig:
    """Prompt/solution pairs streamed through HF datasets (LLaDA-style SFT); prompts are never masked."""

    source: str = ""  # local JSONL/parquet file(s): a path, a glob, or comma-separated; or a hub dataset name
    subset: str = ""  # hub dataset configuration name (e.g. educational_instruct)
    split: str = "train"
    prompt_field: str = "prompt"
    solution_field: str = "solution"
    messages_field: str = ""  # non-empty: read chat messages [{role, content}] from this column instead
    template: str = "{prompt}"  # plain template for the prompt when the tokenizer has no chat template
    # How a prompt (and its solution) becomes tokens; one definition for training and code-eval:
    #   auto        the tokenizer's chat template when it has one, else `template` (+ BOS)
    #   chat        the tokenizer's chat template (an error when it has none)
    #   template    `template` (+ BOS)
    #   prism_code  the PRISM authors' raw code instruction (no special tokens), solution wrapped in <py> tags
    prompt_format: str = "auto"
    entry_point_field: str = "entry_point"  # prism_code: the column naming the function to define
    tokenizer: str = ""  # local directory (or hub name when online)
    max_length: int = 512  # tokens per sequence, prompt + solution + EOS
    overlong: str = "truncate"  # truncate (the answer) | drop (the sample)
    padding: str = "eos"  # eos: pad to max_length with EOS counted as answer (LLaDA) | bucket: length buckets
    bucket_pool: int = 64  # bucket mode: micro-batches pooled and sorted by length before batching
    shuffle_buffer: int = 0  # 0 keeps file order
    seed: int = 0
    heldout_source: str = ""  # prompt/solution file(s) for the head's calibration; empty = no calibration
    # task=packed_text (MDLM's OpenWebText): documents wrapped with BOS/EOS, cut into max_length sequences.
    text_field: str = "text"  # the document column of JSONL/parquet rows (a .txt file is one document)
    heldout_docs: int = 0  # the stream's first N documents are held out (validation loss, MAUVE references)


@dataclass
class SamplerConfig:
    """Sampling: step counts, remask policies (each optionally "policy:count") and unmask order to run."""

    steps: list[int] = field(default_factory=lambda: [6, 11, 22])
    # "policy" uses remask_count; "policy:count" overrides it, e.g. "remdm:binomial" is ReMDM-cap.
    policies: list[str] = field(default_factory=lambda: ["none", "remdm", "remdm-conf", "prism"])
    remask_count: str = "fixed"  # fixed (K per step) | binomial (K ~ Bin(#clean, min(eta, sigma_max))) | per-token
    remask_k: int = 2
    eta: float = 0.2  # binomial remask rate cap (ReMDM's eta_cap)
    unmask_order: str = "random"
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 500
    seed: int = 1234
    n_seeds: int = 1  # evaluation repeats with seeds seed, seed+1, ... (mean and 95% intervals)
    critic: str = ""  # token-critic rows: the critic export; empty = <run_dir>/critic/final
    # The demo's mechanism report (sudoku/mechanism.py): how well each remask score finds wrong cells, on this many
    # evaluation puzzles at every N in steps (0 = no report).
    mechanism_puzzles: int = 0
    # Blockwise semi-autoregressive sampling (LLaDA, code-eval): prompt + gen_length masks in blocks.
    gen_length: int = 256
    block_length: int = 32
    k_block: int = 4  # remasks per block (fixed count), on the steps nearest the block's middle
    cfg_scale: float = 0.0  # classifier-free guidance (0 = off)
    forbid_eos: bool = False  # never sample EOS (nor LLaDA's <|eot_id|>)
    eos_confidence: float = 1.0  # < 1 ranks EOS proposals lower when choosing what to unmask (confidence order)
    stop_at_eos: bool = False  # stop a sample once a finished block holds EOS (the rest is EOS)
    cache: str = "none"  # none | prefix | dual: KV cache of the LLaDA backbone (Fast-dLLM style)
    threshold: float = 0.0  # > 0: unmask every masked token of the block at or above this confidence (at least one)
    # With a threshold: "ignore" (Fast-dLLM) passes over a block until it is full, whatever `steps` says; "cap"
    # makes a block's planned steps the most it gets (its last planned step fills what is left).
    threshold_steps: str = "ignore"
    # > 0: the PRISM authors' LLaDA canvas: prompt + masks up to `canvas` positions per row, blocks of block_length
    # from each row's prompt end to the canvas end, steps // (canvas // block_length) steps per block. 0: prompt +
    # gen_length masks (LLaDA's own generate.py).
    canvas: int = 0
    # Algorithm 2 (OWT) and the loop samplers; "policy:count/loop" rows (see core/schedules).
    remask_start: float = 0.0  # l_on as a fraction of N: nothing is remasked before step ceil(remask_start * N)
    eta_steps: float = 0.0  # > 0: eta = eta_steps / N (the paper's OWT rule uses 2.56); 0 uses `eta`
    eta_cap: bool = True  # binomial rate min(eta, sigma_max) as the authors' code; false: eta (Algorithm 2 as printed)
    loop_m: int = 20  # PRISM-loop: positions remasked uniformly at random and refilled per loop step
    loop_fraction: float = 0.5  # PRISM-loop: share of the N steps spent in the terminal loop
    loop_t_on: float = 0.55  # ReMDM-loop: the loop runs while t_off < t <= t_on (t from 1 to 0)
    loop_t_off: float = 0.05
    loop_alpha_on: float = 0.9  # ReMDM-loop: share of tokens unmasked when the loop starts (held during it)
    loop_eta: float = 0.02  # ReMDM-loop: per-token remask probability in the loop


@dataclass
class CodeEvalConfig:
    """Code benchmarks: data locations (empty = the hub / the packages' own data), sampling and execution."""

    mbpp_path: str = ""  # mbpp.jsonl (974 problems); empty = google-research-datasets/mbpp when online
    mbpp_plus_path: str = ""  # evalplus MbppPlus jsonl (sets MBPP_OVERRIDE_PATH); empty = evalplus's download
    humaneval_plus_path: str = ""  # evalplus HumanEvalPlus jsonl (HUMANEVAL_OVERRIDE_PATH)
    tasks: str = ""  # subset by id, e.g. "11-510" (MBPP's test split); empty = all
    n_samples: int = 1  # samples per task (pass@k for k <= n)
    batch_size: int = 8  # prompts per sampler batch
    merge_adapter: bool = True  # fold LoRA into the base for faster sampling
    timeout_s: float = 10.0  # per program, wall clock and CPU
    memory_mb: int = 2048  # address-space limit per program
    workers: int = 0  # parallel programs (0 = one per core)


@dataclass
class TextEvalConfig:
    """Unconditional text generation scored as the paper's Table 2 (MAUVE, gen-PPL, entropy)."""

    n_samples: int = 5000  # samples per (policy, N) cell
    batch_size: int = 32  # sequences per sampler batch
    scorer: str = "gpt2-large"  # causal LM folder (or hub name) for generative perplexity
    scorer_batch_size: int = 8
    # The scorer's weights: float32 (MDLM, ReMDM and the PRISM authors) or bfloat16 (faster, other numbers); every
    # score records it, and a table refuses cells scored in different dtypes.
    scorer_dtype: str = "float32"
    featurizer: str = "gpt2-large"  # MAUVE's featuriser model folder (or hub name): mauve-text's default
    mauve_references: int = 5000  # held-out documents that are MAUVE's human text
    out_dir: str = ""  # empty = <run_dir>/text_eval
    scorer_steps: int = 600  # the CPU text demo: training steps of the small GPT-2 it trains as scorer/featuriser

    def __post_init__(self) -> None:
        """Refuse a scorer dtype gen-PPL cannot use before anything is sampled."""
        if self.scorer_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"text_eval.scorer_dtype={self.scorer_dtype!r}: expected float32 or bfloat16")


@dataclass
class RunConfig:
    """Everything one run needs; recipes are YAML files with this shape."""

    run_dir: str = "runs/sudoku"
    seed: int = 0
    # native | portable: CPU kernels that train the same bits on every x86-64 machine (engine/cpu_kernels.py)
    cpu_kernels: str = "native"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quality_head: QualityHeadConfig = field(default_factory=QualityHeadConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    prism: PrismConfig = field(default_factory=PrismConfig)
    task: str = "sudoku"  # sudoku | text (prompt/solution pairs) | packed_text (documents, MDLM/OWT)
    data: SudokuDataConfig = field(default_factory=SudokuDataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    pretrain: StageConfig = field(default_factory=StageConfig)
    finetune: StageConfig = field(default_factory=StageConfig)
    critic: CriticStageConfig = field(default_factory=CriticStageConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    codeeval: CodeEvalConfig = field(default_factory=CodeEvalConfig)
    text_eval: TextEvalConfig = field(default_factory=TextEvalConfig)


def _coerce(value, tp, source: str, key: str):
    """Check/convert a YAML value to the annotated type; errors name the source and dotted key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, source, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{source}: {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, source: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    dotted = lambda k: f"{prefix}.{k}" if prefix else k  # noqa: E731
    for key in data:
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{dotted(key)}'; valid keys here: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], source, dotted(k)) for k, v in data.items()})


def _set_dotted(tree: dict, dotted: str, value, where: str) -> None:
    node, cls = tree, RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"{where}: unknown key '{'.'.join(parts[:i + 1])}'; "
                              f"valid keys here: {', '.join(sorted(fields))}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            cls = typing.get_type_hints(cls)[part]
            node = node.setdefault(part, {})


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe name shipped in prism_ds/recipes (without .yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe '{name_or_path}' not found (not a YAML file; shipped recipes: {', '.join(names)})")


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a recipe (default values when None) and apply `key.sub=value` overrides in order."""
    tree: dict = {}
    source = "defaults"
    if recipe:
        path = resolve_recipe(recipe)
        source = str(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _build(RunConfig, tree, source)  # report recipe errors against the recipe file
    sources = source
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw), f"override '{item}'")
        sources = f"{source} + command-line overrides"
    return _build(RunConfig, tree, sources)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (for YAML dumps and TensorBoard text)."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
