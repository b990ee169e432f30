"""How a prompt becomes token ids (and a solution becomes answer text): one definition for training rows
and code-eval tasks, chosen by `text.prompt_format`.

- auto:       the tokenizer's chat template when it has one, else `text.template` with one BOS (prism-ds's
              behaviour before the option existed);
- chat:       the chat template, an error when the tokenizer has none;
- template:   `text.template` with one BOS, even when the tokenizer has a chat template;
- prism_code: the PRISM authors' LLaDA code prompt: their instruction with the task text and the function
              name, tokenized without special tokens (no BOS, no chat template); the solution is the code
              wrapped as "\\n<py>\\n" + code + "\\n</py>".
"""
from __future__ import annotations

from prism_ds.config import ConfigError
from prism_ds.text.tokenizer import encode_plain, encode_prompt

PROMPT_FORMATS = ("auto", "chat", "template", "prism_code")

# Reproduced verbatim from SeunggeunKimkr/PRISM, PRISM_llada/train.py (INSTRUCTION; code_utils.py holds the
# same string), so that prism-ds fine-tunes and evaluates LLaDA on the paper's prompt. Do not edit: the
# model is trained on these exact tokens, and any rewording changes the regime being reproduced.
PRISM_CODE_INSTRUCTION = """Write ONLY valid Python code for the task below.
- Output code between <py> and </py> only (no extra text).
- No markdown, no explanations, no comments.
- Do not print or read input. Do not write files or access networks.
- Use only Python standard library imports at the top if needed.
- Define exactly one top-level function {func_name} (keep the name).
- Do not include tests or `if __name__ == "__main__":`.

Task:
{task_text}

Format:
<py>
# optional stdlib imports

def {func_name}(...):
    ...
</py>
"""


def check_prompt_format(fmt: str, tokenizer=None) -> None:
    """ConfigError naming text.prompt_format for an unknown format, or "chat" with a tokenizer lacking a template."""
    if fmt not in PROMPT_FORMATS:
        raise ConfigError(f"text.prompt_format: expected one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    if fmt == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("text.prompt_format=chat: the tokenizer has no chat template; use auto, template or "
                          "prism_code, or a tokenizer that has one")


def prompt_ids(tokenizer, fmt: str, prompt: str, entry_point: str | None = None, template: str = "{prompt}",
               messages: list[dict] | None = None) -> list[int]:
    """Token ids of `prompt` (or chat `messages`, which default to one user turn) in format `fmt`."""
    check_prompt_format(fmt, tokenizer)
    if fmt == "prism_code":
        if not entry_point:
            raise ValueError("text.prompt_format=prism_code: no entry point (the function the prompt asks for)")
        text = PRISM_CODE_INSTRUCTION.format(task_text=prompt, func_name=entry_point)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    plain = template.format(prompt=prompt)
    if fmt == "template":
        return encode_plain(tokenizer, plain)
    # auto and chat (whose template was checked above) share encode_prompt's rule.
    return encode_prompt(tokenizer, messages or [{"role": "user", "content": prompt}], plain)


def solution_text(fmt: str, solution: str) -> str:
    """The answer text a training row teaches: prism_code wraps the code in the authors' <py> tags."""
    return f"\n<py>\n{solution}\n</py>" if fmt == "prism_code" else solution
