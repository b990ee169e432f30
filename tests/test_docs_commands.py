"""Every command in README.md and docs/*.md parses with the parser it would run, and every link resolves.

The commands are taken from the shell blocks (```bash, ```sh, ...) and from inline code spans that are whole
commands. Each is cut at pipes, `&&`, `||` and `;`, its `\\` continuations joined, its comments and leading
`VAR=value` assignments dropped (an assignment on a line of its own is substituted into later `$VAR` of the same
block), and the usage notation of a synopsis read as written: `[--flag X]` as if the flag were given, `a|b|c`
as each alternative in turn, `...` and placeholders (`DIR`, `<run_dir>`, `$OUT`) as values.

What runs, and how its arguments are checked (nothing is trained, loaded or launched):

- `prism-ds ...`, `.venv/bin/prism-ds ...`, `python -m prism_ds.cli ...`: `prism_ds.cli.parse_args` (the command's own
  parsing, flags and dotted overrides in any order); the recipe must resolve, every override's dotted key must
  exist in the config dataclasses (`prism_ds.config._set_dotted`, the key walk `load_config` applies), and the
  overrides whose values are not placeholders must load (`load_config`, types checked; it reads no data files);
- `python eval/<script>.py ...`, `python -m <module> ...`: the script's own argparse parser, captured when its
  `main()` calls `parse_args` (nothing after that runs); an `overrides` positional is checked as above;
- `deepspeed ...`: DeepSpeed's launcher parser, then the user script or `--module` as above;
- `bash launchers/...`, `launchers/... .sh`, `sbatch ... launchers/slurm.sbatch ...`: the arguments the script
  forwards with `--module <m> <fixed args> "$@"` are checked as that module's command line; `DS_LAUNCH_ARGS` is
  checked against DeepSpeed's launcher parser; other shell scripts (setup.sh, the GPU kit's run.sh) accept the
  options their `case` patterns list.

A failure names the file, the line and the command.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
from doc_commands import (DEEPSPEEDS, DOC_FILES, PRISM_COMMANDS, PYTHONS, REPO, SHELLS, SYNOPSIS_WORDS, Invocation,
                          all_invocations, code_spans, extract, fences, is_placeholder)

# Scripts the docs run whose arguments cannot be checked without running them, with the reason.
UNCHECKABLE_SCRIPTS = {
    "eval/gpu/check_export.py": "reads sys.argv[1] itself (no argparse parser to check against)",
}
# Modules of other projects that the docs run with `python -m`: they exist (checked), their arguments are not.
THIRD_PARTY_MODULES = {
    "pytest": "pytest's own command line (calling its main() here would start a test session inside this one)",
}


# ---------------------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------------------

class _Captured(Exception):
    """Raised in place of parse_args once the parser a script builds has been captured."""


class _Fail(Exception):
    """The invocation would not run: the message says why."""


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _capture_parser(key: str, load) -> argparse.ArgumentParser:
    """Call `load()` (a script's main) with parse_args patched to capture the parser and stop right there."""
    if key in _PARSERS:
        return _PARSERS[key]
    box = {}
    orig = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def grab(self, *args, **kwargs):
        box.setdefault("parser", self)
        raise _Captured

    argparse.ArgumentParser.parse_args = grab
    argparse.ArgumentParser.parse_known_args = grab
    saved_argv, saved_env = sys.argv, dict(os.environ)
    try:
        sys.argv = [key]
        load()
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = orig
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    if "parser" not in box:
        raise AssertionError(f"{key}: main() returned without calling argparse")
    _PARSERS[key] = box["parser"]
    return box["parser"]


def _script_main(rel: str):
    path = REPO / rel
    saved_env = dict(os.environ)
    try:  # some scripts set DS_ACCELERATOR at import when no GPU is present: keep this process's environment
        spec = importlib.util.spec_from_file_location("_docs_cmd_" + re.sub(r"\W", "_", rel), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    return module.main


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise _Fail(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "argparse exit") from None


def _walk_key(config, key: str) -> None:
    """The same walk as config._set_dotted, should that private helper be renamed: each part a dataclass field."""
    import dataclasses
    import typing

    cls = config.RunConfig
    for i, part in enumerate(key.split(".")):
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in names:
            raise config.ConfigError(f"unknown key '{'.'.join(key.split('.')[:i + 1])}'")
        cls = typing.get_type_hints(cls)[part]


def _check_overrides(overrides: list[str], recipe: str | None, typed: bool = True) -> None:
    from prism_ds import config

    resolve_key = getattr(config, "_set_dotted", None)
    for item in overrides:
        if item in SYNOPSIS_WORDS:
            continue
        if "=" not in item:
            raise _Fail(f"override {item!r} is not key=value")
        key = item.split("=", 1)[0].strip()
        try:
            if resolve_key is not None:
                resolve_key({}, key, None, f"override '{item}'")  # walks the dataclasses, applies nothing real
            else:
                _walk_key(config, key)
        except config.ConfigError as exc:
            raise _Fail(str(exc)) from None
    if recipe is not None and is_placeholder(recipe):
        recipe = None
    try:
        if recipe is not None:
            config.resolve_recipe(recipe)
        if typed:
            config.load_config(recipe, [o for o in overrides if not is_placeholder(o.split("=", 1)[1])])
    except config.ConfigError as exc:
        raise _Fail(str(exc)) from None


def _check_prism_ds(argv: list[str]) -> None:
    from prism_ds import cli

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.parse_args(argv) if hasattr(cli, "parse_args") else cli.build_parser().parse_args(argv)
    except SystemExit:
        raise _Fail(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "argparse exit") from None
    overrides = list(getattr(args, "overrides", []) or [])
    # `sample` and `eval`-like commands without --recipe read the checkpoint's config: keys are still checked.
    _check_overrides(overrides, getattr(args, "recipe", None))


def _check_module(module: str, argv: list[str]) -> None:
    if module in {"prism_ds.cli", "prism_ds"}:
        if importlib.util.find_spec(f"{module}.__main__" if module == "prism_ds" else module) is None:
            raise _Fail(f"python -m {module}: no such runnable module")
        _check_prism_ds(argv)
        return
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise _Fail(f"python -m {module}: no such module")
    if module.split(".")[0] in THIRD_PARTY_MODULES:
        pytest.skip(f"python -m {module}: {THIRD_PARTY_MODULES[module.split('.')[0]]}")
    mod = importlib.import_module(module)
    parser = _capture_parser(module, lambda: mod.main())
    _check_namespace(_parse(parser, argv))


def _check_namespace(ns: argparse.Namespace) -> None:
    overrides = getattr(ns, "overrides", None)
    if isinstance(overrides, list) and overrides:
        _check_overrides(overrides, getattr(ns, "recipe", None), typed=False)


def _check_python_script(rel: str, argv: list[str]) -> None:
    rel = rel.removeprefix("./")
    if not (REPO / rel).is_file():
        raise _Fail(f"{rel}: no such file")
    if rel in UNCHECKABLE_SCRIPTS:
        pytest.skip(f"{rel}: {UNCHECKABLE_SCRIPTS[rel]}")
    parser = _capture_parser(rel, _script_main(rel))
    _check_namespace(_parse(parser, argv))


def _check_deepspeed(argv: list[str]) -> None:
    runner = pytest.importorskip("deepspeed.launcher.runner")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = runner.parse_args(argv)
    except SystemExit:
        raise _Fail("deepspeed: " + (err.getvalue().strip().splitlines() or ["argparse exit"])[-1]) from None
    if args.module:
        _check_module(args.user_script, list(args.user_args))
    elif args.user_script.endswith(".py"):
        _check_python_script(args.user_script, list(args.user_args))
    else:
        raise _Fail(f"deepspeed runs {args.user_script!r}: neither --module nor a .py script")


def _check_shell_script(rel: str, argv: list[str], env: dict[str, str]) -> None:
    rel = rel.removeprefix("./")
    path = REPO / rel
    if not path.is_file():
        raise _Fail(f"{rel}: no such file")
    text = path.read_text()
    if "DS_LAUNCH_ARGS" in env:
        _check_deepspeed_flags(shlex.split(env["DS_LAUNCH_ARGS"]))
    forward = re.search(r"--module\s+(\S+)\s+(.*?)\"\$@\"", text, re.S)
    if forward:  # the launchers: deepspeed ... --module prism_ds.cli train --no-progress "$@"
        fixed = shlex.split(forward.group(2).replace("\\\n", " "))
        _check_module(forward.group(1), [*fixed, *argv])
        return
    accepted = set(re.findall(r"^\s*(-[-\w]+)\)", text, re.M))  # case "$1" in  --test) ... ;;
    for a in argv:
        if a.startswith("-") and a not in accepted:
            raise _Fail(f"{rel} does not accept {a} (its case patterns: {', '.join(sorted(accepted)) or 'none'})")


def _check_deepspeed_flags(argv: list[str]) -> None:
    """DeepSpeed launcher flags alone (`DS_LAUNCH_ARGS`, or prose naming them), checked with a stand-in script."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            runner.parse_args([*argv, "script.py"])
    except SystemExit:
        raise _Fail("deepspeed: " + (err.getvalue().strip().splitlines() or ["argparse exit"])[-1]) from None


def _check_mention(word: str, argv: list[str]) -> bool:
    """Prose names a command without its arguments (`prism-ds eval`, `eval/mechanism.py`, `deepspeed --num_gpus 2`):
    check what is named (the subcommand, file, module or launcher flags) and return True; else return False."""
    if word in PRISM_COMMANDS and len(argv) <= 1:
        try:  # the subcommand must exist; its required flags may be absent
            _check_prism_ds(argv)
        except _Fail as exc:
            if "the following arguments are required" not in str(exc):
                raise
        return True
    if word in PYTHONS and len(argv) == 2 and argv[0] == "-m":
        if importlib.util.find_spec(argv[1]) is None:
            raise _Fail(f"python -m {argv[1]}: no such module")
        return True
    if (word.endswith((".py", ".sh")) or word.startswith("launchers/")) and not argv:
        if not (REPO / word).is_file():
            raise _Fail(f"{word}: no such file")
        return True
    if word in DEEPSPEEDS and not any(a == "--module" or a.endswith(".py") for a in argv):
        _check_deepspeed_flags(argv)
        return True
    return False


def check(inv: Invocation) -> None:
    """Raise _Fail (or skip) when the invocation would not parse."""
    if inv.error:
        raise _Fail(inv.error)
    argv = list(inv.argv)
    if "DS_LAUNCH_ARGS" in inv.env and argv[0] not in SHELLS and not argv[0].startswith("launchers/"):
        _check_deepspeed_flags(shlex.split(inv.env["DS_LAUNCH_ARGS"]))
    word = argv.pop(0)
    if inv.inline and _check_mention(word, argv):
        return
    if word in PRISM_COMMANDS:
        _check_prism_ds(argv)
    elif word in PYTHONS:
        if argv[:1] == ["-m"]:
            _check_module(argv[1], argv[2:])
        elif argv and argv[0].endswith(".py"):
            _check_python_script(argv[0], argv[1:])
        else:
            pytest.skip(f"python {' '.join(argv[:1])}: not a script or module invocation")
    elif word in DEEPSPEEDS:
        _check_deepspeed(argv)
    elif word == "sbatch":
        while argv and argv[0].startswith("-"):
            argv.pop(0)  # sbatch's own options (--nodes=2, ...)
        _check_shell_script(argv[0], argv[1:], inv.env)
    elif word in SHELLS:
        script = argv[0]
        if script.endswith(".py"):
            raise _Fail(f"bash runs a Python file: {script}")
        _check_shell_script(script, argv[1:], inv.env)
    elif word.endswith(".py"):
        _check_python_script(word, argv)
    else:
        _check_shell_script(word, argv, inv.env)


def failure(inv: Invocation) -> str | None:
    """The error message naming file:line and the command, or None when it parses."""
    try:
        check(inv)
    except _Fail as exc:
        if inv.elided and "the following arguments are required" in str(exc):
            return None
        return f"{inv.where}: `{inv.text}` (checked as {shlex.join(inv.argv)}): {exc}"
    return None


INVOCATIONS = all_invocations()


@pytest.mark.parametrize("inv", INVOCATIONS, ids=[f"{i.where} {shlex.join(i.argv)[:60]}" for i in INVOCATIONS])
def test_doc_command_parses(inv: Invocation):
    msg = failure(inv)
    assert msg is None, msg


def test_the_docs_have_commands():
    """The extractor finds the commands the README promises (a broken extractor would check nothing)."""
    texts = [" ".join(i.argv) for i in INVOCATIONS]
    assert len(INVOCATIONS) >= 40
    assert "bash launchers/setup.sh" in texts and ".venv/bin/prism-ds demo" in texts
    assert any(t.startswith("prism-ds code-eval generate") for t in texts)
    assert any(t.startswith(".venv/bin/deepspeed") for t in texts)
    assert any(t.startswith("launchers/") or t.startswith("bash launchers/") for t in texts)
    assert any(".py" in t.split()[1] for t in texts if t.split()[0] in PYTHONS and len(t.split()) > 1)


# ---------------------------------------------------------------------------------------------------------------
# The checker fails when it should
# ---------------------------------------------------------------------------------------------------------------

def _one(md: str, path: Path = REPO / "README.md") -> list[Invocation]:
    return extract(path, md)


def test_extractor_reads_shell_notation():
    md = ("intro `prism-ds demo\nseed=1 run_dir=runs/x` and `cp a b`\n\n"
          "```bash\n"
          "# a comment\n"
          "M=runs/m; S=\"sampler.steps=4 sampler.k_block=2\"\n"
          "DS_ACCELERATOR=cpu prism-ds eval --checkpoint $M \\\n"
          "    $S   # trailing comment\n"
          "prism-ds train --stage pretrain|finetune [--recipe R] [key.sub=value ...] && echo done | tee log\n"
          "```\n"
          "```python\nprism-ds train --nope\n```\n")
    invs = _one(md)
    got = [(i.line, i.argv) for i in invs]
    assert got == [
        (7, ["prism-ds", "eval", "--checkpoint", "runs/m", "sampler.steps=4", "sampler.k_block=2"]),
        (9, ["prism-ds", "train", "--stage", "pretrain", "--recipe", "R"]),
        (9, ["prism-ds", "train", "--stage", "finetune", "--recipe", "R"]),
        (1, ["prism-ds", "demo", "seed=1", "run_dir=runs/x"]),
    ]
    assert invs[0].env == {"DS_ACCELERATOR": "cpu"}
    assert all(failure(i) is None for i in invs)


@pytest.mark.parametrize("bad, expect", [
    ("prism-ds eval --checkpoint runs/x/finetune/final --recipie sudoku_cpu", "unrecognized arguments: --recipie"),
    ("prism-ds eval --checkpiont runs/x/finetune/final", "required: --checkpoint"),
    ("prism-ds train --stage pretrain sampler.stepz=4", "unknown key 'sampler.stepz'"),
    ("prism-ds train --stage pretrain finetune.steps=many", "finetune.steps"),
    ("prism-ds demo --recipe sudoku_4x4", "recipe 'sudoku_4x4' not found"),
    ("prism-ds code-eval generate --benchmark mbpp --model M --out F --k_blocks 4", "unrecognized arguments"),
    (".venv/bin/python eval/bench_sampler.py --sizes small", "unrecognized arguments: --sizes"),
    (".venv/bin/python eval/no_such_script.py", "no such file"),
    (".venv/bin/deepspeed --num-gpus 8 --module prism_ds.cli train --stage finetune", "deepspeed"),
    (".venv/bin/deepspeed --num_gpus 8 --module prism_ds.cli train --stage finetuning", "invalid choice"),
    ("launchers/single_node.sh --stage finetune --recipes llada_8b", "unrecognized arguments"),
    ("sbatch --nodes=2 launchers/slurm.sbatch --stage finetune model.pth=/x", "unknown key 'model.pth'"),
    ("DS_LAUNCH_ARGS=\"--no-ssh\" launchers/multi_node.sh --stage finetune", "deepspeed"),
    ("bash launchers/setup.sh --tests", "does not accept --tests"),
    ("prism-ds eval --checkpoint 'runs/x", "shell syntax"),
    (".venv/bin/python -m prism_ds demo", "no such runnable module"),
    (".venv/bin/python -m prism_ds.engine.hostfile chek hostfile", "invalid choice"),
])
def test_a_broken_command_fails_with_file_and_line(bad, expect):
    invs = _one(f"text\n\n```bash\n{bad}\n```\n")
    assert len(invs) == 1
    msg = failure(invs[0])
    assert msg is not None and msg.startswith("README.md:4: ") and expect in msg, msg


def test_a_renamed_flag_in_a_real_doc_command_fails():
    """Take the docs' own code-eval command, rename one flag in a copy of the text, and see the check fail."""
    path = next(p for p in DOC_FILES if "--k-blocks" in p.read_text())
    text = path.read_text()
    assert all(failure(i) is None for i in extract(path, text) if "--k-blocks" in i.argv)
    # (argparse accepts a prefix of a flag, so `--k-block` would still parse: rename it to something else)
    broken = [i for i in extract(path, text.replace("--k-blocks", "--k_blocks")) if "--k_blocks" in i.argv]
    assert broken and all(failure(i) and "unrecognized arguments: --k_blocks" in failure(i) for i in broken)


# ---------------------------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _blank_code(text: str) -> str:
    """The text with fenced blocks and code spans blanked out (line numbers kept)."""
    prose = _blank_code_fences_only(text)
    out, last = [], 0
    spans = [(a, b) for a, b, _ in code_spans(prose)]
    for a, b in spans:
        out.append(prose[last:a])
        out.append(re.sub(r"[^\n]", " ", prose[a:b]))
        last = b
    out.append(prose[last:])
    return "".join(out)


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _blank_code_fences_only(text).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def _blank_code_fences_only(text: str) -> str:
    lines = text.split("\n")
    list(fences(lines))  # headings inside code blocks are not headings
    return "\n".join(lines)


def _links(text: str):
    """Yield (line, target) of the Markdown links outside code blocks and code spans."""
    prose = _blank_code(text)
    for m in re.finditer(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
        yield prose.count("\n", 0, m.start()) + 1, m.group(1)


def link_failures(path: Path, text: str | None = None) -> list[str]:
    """'file:line: ...' for every relative link whose file (or heading anchor) does not exist."""
    text = path.read_text() if text is None else text
    bad = []
    for line, target in _links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = Path(os.path.normpath(path.parent / file_part)) if file_part else path  # as GitHub resolves it
        where = f"{path.relative_to(REPO)}:{line}"
        if not dest.exists():
            bad.append(f"{where}: link to {target}: {file_part} does not exist")
        elif anchor and dest.suffix == ".md":
            if anchor not in _anchors(text if dest == path else dest.read_text()):
                bad.append(f"{where}: link to {target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return bad


def test_every_link_resolves():
    bad = [b for p in DOC_FILES for b in link_failures(p)]
    assert not bad, "\n".join(bad)


def test_link_check_fails_on_a_moved_file():
    readme = REPO / "README.md"
    md = ("# T\n\n## A heading: `code`\n\nsee [x](prism_ds/cli.py), [y](#a-heading-code), [z](prism_ds/nope.py),\n"
          "[w](#no-heading) and `[not a link](nope.md)`\n\n```bash\n[nor this](nope.md)\n```\n")
    bad = link_failures(readme, md)
    assert len(bad) == 2 and bad[0].startswith("README.md:5: ") and "prism_ds/nope.py" in bad[0], bad
    assert "#no-heading" in bad[1] and bad[1].startswith("README.md:6: ")


def test_every_docs_page_opens_with_a_summary_linking_back():
    """Each docs page: a title, then one paragraph saying what it covers, with a link back to the README; and the
    README links every page."""
    readme = (REPO / "README.md").read_text()
    for path in DOC_FILES[1:]:
        blocks = path.read_text().split("\n\n")
        assert blocks[0].startswith("# "), f"{path.relative_to(REPO)}: no title"
        assert "](../README.md" in blocks[1], f"{path.relative_to(REPO)}: its first paragraph does not link the README"
        assert f"](docs/{path.name})" in readme, f"README.md does not link docs/{path.name}"
