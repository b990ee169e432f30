"""Code extraction from a model's answer, in order of preference:

1. fenced blocks marked python (```python / ```py / ```Python); an unclosed fence (the answer was cut
   at gen_length) runs to the end of the text;
2. the paper's <py> ... </py> tags;
3. any other fenced block;
4. the whole answer as bare code.
Among several blocks, the first that defines the entry point wins, else the first one.
"""
from __future__ import annotations

import re

_PY_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAG = re.compile(r"<py>(.*?)(?:</py>|\Z)", re.DOTALL)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in `text` (see the module docstring); never raises, may return ""."""
    for pattern in (_PY_FENCE, _PY_TAG, _ANY_FENCE):
        blocks = [b.strip("\n") for b in pattern.findall(text) if b.strip()]
        if blocks:
            if entry_point:
                defining = [b for b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
                if defining:
                    return defining[0]
            return blocks[0]
    return text.strip("\n")


def complete_program(code: str, prompt_code: str, entry_point: str | None) -> str:
    """A HumanEval answer that only continues the given signature gets the prompt prepended."""
    if prompt_code and entry_point and not re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", code):
        return prompt_code + code
    return code
