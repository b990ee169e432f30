"""The commands the README and docs/ write: shell blocks and inline code spans read into the argv each would run
(usage notation resolved), for tests/test_docs_commands.py to check against the real parsers."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).absolute().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
# Words of a usage synopsis that stand for "your arguments here".
SYNOPSIS_WORDS = {"...", "\u2026", "overrides", "key.sub=value"}

PRISM_COMMANDS = {"prism-ds", ".venv/bin/prism-ds"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
DEEPSPEEDS = {"deepspeed", ".venv/bin/deepspeed"}
SHELLS = {"bash", "sh"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Invocation:
    """One command as the docs write it, and the argv (usage notation resolved) that is checked."""

    path: Path
    line: int
    text: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    inline: bool = False
    elided: bool = False  # the docs wrote `...` or <your args>: arguments they leave out may be required ones
    error: str | None = None  # the shell could not split the line (an unbalanced quote)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------

def fences(lines: list[str]):
    """Yield (is_shell_block, start_line_index, block_lines) for fenced blocks, and blank out fences in `lines`."""
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        marker, lang = m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(marker[0])}{{{len(marker)},}}\s*$", lines[j]):
            j += 1
        yield lang in SHELL_FENCES, i, lines[i + 1:j]
        for k in range(i, min(j + 1, len(lines))):
            lines[k] = ""
        i = j + 1


def _logical_lines(block: list[str], first: int):
    """Join `\\` continuations; yield (1-based line of the first physical line, text)."""
    buf, start = [], None
    for k, raw in enumerate(block):
        if start is None:
            start = first + k
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        yield start + 1, " ".join(s.strip() for s in buf)
        buf, start = [], None
    if buf:
        yield start + 1, " ".join(s.strip() for s in buf)


def code_spans(text: str):
    """Yield (start, end, content) of Markdown inline code spans (a run of n backticks closed by a run of exactly n)."""
    i = 0
    while True:
        m = re.compile(r"`+").search(text, i)
        if not m:
            return
        run = m.group(0)
        close = re.compile(rf"(?<!`){run}(?!`)").search(text, m.end())
        if not close or "\n\n" in text[m.end():close.start()]:
            i = m.end()  # a run without its closing run is literal text
            continue
        yield m.start(), close.end(), text[m.end():close.start()].strip()
        i = close.end()


def _tokens(text: str) -> list[str]:
    text = re.sub(r"<[^<>\n]* [^<>\n]*>", " ... ", text)  # <your args>: arguments of the reader's choosing
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _split_commands(tokens: list[str]) -> list[list[str]]:
    """Cut a token list at `|`, `||`, `&&`, `;` and `&` (a `|` inside a word is usage notation, kept)."""
    out, cur = [], []
    for t in tokens:
        if t in {"|", "||", "&&", ";", "&", ";;"}:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    out.append(cur)
    return [c for c in out if c]


def is_placeholder(value: str) -> bool:
    """DIR, FILE.jsonl, <run_dir>, $OUT, ... and the like: a value the reader fills in."""
    return (value in {"...", ""} or "..." in value or "<" in value or value.startswith("$")
            or re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?", value) is not None)


def _usage(argv: list[str]) -> list[list[str]]:
    """Resolve synopsis notation: drop [ ] around optional parts and `...`; expand a|b|c into one argv each."""
    flat = []
    for t in argv:
        if t.startswith("[") and "=" not in t.split("[", 1)[0]:
            t = t.lstrip("[")
        if t.endswith("]") and "[" not in t:
            t = t.rstrip("]")
        if t and t not in SYNOPSIS_WORDS:
            flat.append(t)
    variants = [[]]
    for t in flat:
        if "|" in t and "=" not in t and "/" not in t:
            alts = t.split("|")  # --stage pretrain|finetune|critic
        elif re.fullmatch(r"\d+(/\d+)+", t):
            alts = t.split("/")  # --node_rank 0/1
        else:
            alts = [t]
        variants = [v + [a] for v in variants for a in alts]
    return variants


def _first_word(tokens: list[str]) -> str | None:
    rest = list(tokens)
    while rest and ASSIGNMENT.match(rest[0]):
        rest.pop(0)
    return rest[0] if rest else None


def _is_command_word(word: str | None) -> bool:
    if word is None:
        return False
    return (word in PRISM_COMMANDS or word in PYTHONS or word in DEEPSPEEDS or word in SHELLS or word == "sbatch"
            or word.startswith("launchers/") or (word.startswith("eval/") and word.endswith((".py", ".sh"))))


def extract(path: Path, text: str | None = None) -> list[Invocation]:
    """Every checked command of one Markdown file."""
    text = path.read_text() if text is None else text
    lines = text.split("\n")
    found: list[Invocation] = []
    for is_shell, start, block in list(fences(lines)):
        if not is_shell:
            continue
        variables: dict[str, str] = {}
        for lineno, logical in _logical_lines(block, start + 1):
            found += _commands(path, lineno, logical, variables, inline=False)
    prose = "\n".join(lines)  # fenced blocks blanked, line numbers kept
    for offset, _, span in code_spans(prose):
        span = " ".join(span.split())
        try:
            word = _first_word(_tokens(span))
        except ValueError:
            continue
        if _is_command_word(word):
            found += _commands(path, prose.count("\n", 0, offset) + 1, span, {}, inline=True)
    return found


def _commands(path: Path, lineno: int, logical: str, variables: dict[str, str], inline: bool) -> list[Invocation]:
    out = []
    try:
        tokens = _tokens(logical)
    except ValueError as exc:  # reported by the test of this line rather than breaking the collection
        return [Invocation(path, lineno, logical, ["<unsplittable>"], inline=inline, error=f"shell syntax: {exc}")]
    for cmd in _split_commands(tokens):
        env = {}
        while cmd and ASSIGNMENT.match(cmd[0]):
            k, v = cmd.pop(0).split("=", 1)
            env[k] = v
        if not cmd:  # NAME=value on its own: a shell variable later commands of the block use
            variables.update(env)
            continue
        argv = []
        for t in cmd:
            m = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", t)
            if m and m.group(1) in variables:
                argv += shlex.split(variables[m.group(1)])
            else:
                argv.append(t)
        if not _is_command_word(argv[0]):
            continue
        elided = any(t.strip("[]") in {"...", "\u2026"} for t in argv)
        for variant in _usage(argv):
            out.append(Invocation(path, lineno, logical, variant, env, inline, elided))
    return out


def all_invocations() -> list[Invocation]:
    return [inv for p in DOC_FILES for inv in extract(p)]
