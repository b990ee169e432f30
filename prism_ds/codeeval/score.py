"""`prism-ds code-eval score`: execute a samples file's programs in the sandbox; pass@k and per-task results.

mbpp: solution + the task's setup code and three assertions; humaneval: solution + `check(entry_point)`.
mbpp+ / humaneval+: evalplus's own `check_correctness` (base and plus inputs, expected outputs from the
canonical solution via evalplus's `trusted_exec`), run inside the same sandbox, one task per process.
pass@k is the unbiased estimator 1 - C(n - c, k) / C(n, k) averaged over tasks (Chen et al. 2021).
"""
from __future__ import annotations

import base64
import json
import math
import pickle
from pathlib import Path

from prism_ds.codeeval import sandbox
from prism_ds.codeeval.generate import read_samples
from prism_ds.codeeval.tasks import check_benchmark, load_tasks, select

_PLUS_RUNNER = r"""
import base64, json, os, pickle, sys
os.environ["EVALPLUS_MAX_MEMORY_BYTES"] = sys.argv[3]  # evalplus's guard may not raise our address-space limit
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
from evalplus.evaluate import check_correctness
from evalplus.gen.util import trusted_exec
nonce = sys.stdin.readline().strip()
job = pickle.loads(base64.b64decode(sys.stdin.read()))
p, expected = job["problem"], {}
try:
    for part in ("base", "plus"):
        expected[part], expected[part + "_time"] = trusted_exec(
            p["prompt"] + p["canonical_solution"], p[part + "_input"], p["entry_point"], record_time=True,
            output_not_none=p["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS)
    r = check_correctness(job["dataset"], 0, p, job["solution"], expected, fast_check=True)
    base, plus = r["base"][0], r["plus"][0]
    verdict = {"status": "pass" if base == plus == "pass" else "fail", "detail": f"base {base}, plus {plus}"}
except BaseException as e:
    verdict = {"status": "error", "detail": (type(e).__name__ + ": " + str(e))[:300]}
os.write(int(sys.argv[4]), (nonce + " " + json.dumps(verdict) + "\n").encode())
"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with n samples of which c pass."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _programs(rows: list[dict], tasks: dict, benchmark: str) -> list[str]:
    programs = []
    for row in rows:
        task = tasks[str(row["task_id"])]
        solution = row.get("solution")
        if solution is None:  # evalplus's "completion" format: the continuation of the prompt
            solution = task.prompt_code + row["completion"]
        if benchmark.endswith("+"):
            dataset = "mbpp" if benchmark == "mbpp+" else "humaneval"
            job = {"dataset": dataset, "problem": task.problem, "solution": solution}
            programs.append(base64.b64encode(pickle.dumps(job)).decode())
        else:
            programs.append(f"{solution}\n\n{task.tests}\n")
    return programs


def score(benchmark: str, samples: str | Path, cfg, progress: bool = True) -> dict:
    """Run every sample of a file; returns (and writes next to it) the report."""
    check_benchmark(benchmark)
    samples = Path(samples)
    rows = read_samples(samples)
    if not rows:
        raise ValueError(f"{samples}: no samples")
    settings = [r.get("settings") for r in rows]
    if any(s != settings[0] for s in settings):
        raise ValueError(f"{samples}: mixes samples made with different settings; score each setting's file apart")
    if settings[0] and settings[0].get("benchmark") not in (None, benchmark):
        raise ValueError(f"{samples}: generated for --benchmark {settings[0]['benchmark']}, not {benchmark}")
    tasks = {str(t.task_id): t for t in load_tasks(benchmark, cfg.codeeval)}
    for n, row in enumerate(rows, 1):
        if str(row["task_id"]) not in tasks:
            raise ValueError(f"{samples}, sample {n}: task_id {row['task_id']!r} is not a {benchmark} task")
    if settings[0]:  # a file from `generate`: every task of its selection, n_samples each
        wanted = {(str(t.task_id), k) for t in select(list(tasks.values()), settings[0]["tasks"])
                  for k in range(settings[0]["n_samples"])}
        missing = wanted - {(str(r["task_id"]), r.get("sample", 0)) for r in rows}
        if missing:
            first = min(missing, key=lambda m: (len(m[0]), m))
            raise ValueError(f"{samples}: holds {len(wanted) - len(missing)} of the {len(wanted)} samples its settings "
                             f"ask for (e.g. task {first[0]} sample {first[1]} is missing); rerun generate to finish it")
    c = cfg.codeeval
    plus = benchmark.endswith("+")
    verdicts = sandbox.run_many(_programs(rows, tasks, benchmark), timeout_s=c.timeout_s * (6 if plus else 1),
                                memory_mb=c.memory_mb, workers=c.workers, progress=progress,
                                desc=f"executing {benchmark}", runner=_PLUS_RUNNER if plus else sandbox._RUNNER)
    per_task: dict[str, list] = {}
    for row, v in zip(rows, verdicts):
        per_task.setdefault(str(row["task_id"]), []).append({"sample": row.get("sample", 0), "status": v.status,
                                                             "detail": v.detail})
    n = min(len(v) for v in per_task.values())
    ks = [k for k in (1, 10, 100) if k <= n]
    report = {"benchmark": benchmark, "samples": str(samples), "settings": settings[0], "tasks": len(per_task),
              "n_samples": n, "isolation": sandbox.isolation(),
              "pass_at": {f"pass@{k}": sum(pass_at_k(len(v), sum(x["status"] == "pass" for x in v), k)
                                           for v in per_task.values()) / len(per_task) for k in ks},
              "per_task": per_task}
    samples.with_name(samples.name + ".report.json").write_text(json.dumps(report, indent=1))
    return report


def table(reports: list[dict]) -> str:
    """Markdown: one row per samples file (policy, steps, K_block), pass@k columns."""
    ks = sorted({k for r in reports for k in r["pass_at"]}, key=lambda k: int(k.split("@")[1]))
    lines = ["| policy | steps | K_block | tasks | " + " | ".join(ks) + " | samples |",
             "|---|---|---|---|" + "---|" * len(ks) + "---|"]
    for r in reports:
        s = r["settings"] or {}
        cells = " | ".join(f"{100 * r['pass_at'][k]:.1f}%" if k in r["pass_at"] else "-" for k in ks)
        lines.append(f"| {s.get('policy', '?')} | {s.get('steps', '?')} | {s.get('k_block', '?')} | {r['tasks']} | "
                     f"{cells} | {Path(r['samples']).name} |")
    return "\n".join(lines)
