"""text.prompt_format: the PRISM authors' code prompt (prism_code) for training rows and code-eval tasks alike,
MBPP function names from the reference code, the chat/template formats and the errors for bad values."""
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helpers import SHARED, build_tokenizer, text_config, write_jsonl
from prism_ds.codeeval.tasks import CodeTask, first_function_name, load_tasks, task_prompt_ids
from prism_ds.config import ConfigError, RunConfig
from prism_ds.text.prompt_data import PromptSolutionStream, load_tokenizer
from prism_ds.text.prompt_format import PRISM_CODE_INSTRUCTION, prompt_ids, solution_text
from prism_ds.text.tokenizer import encode_prompt

MBPP = SHARED / "data" / "mbpp" / "mbpp.jsonl"
AUTHORS = Path("/work/.mirror/SeunggeunKimkr+PRISM/repo")
needs_mbpp = pytest.mark.skipif(not MBPP.exists(), reason=f"{MBPP} not present")

ROWS = [  # opc-sft-stage2 educational_instruct columns (output: the markdown answer prism_code does not read)
    {"instruction": "Write a function to add two numbers.", "output": "Here it is ...",
     "code": "def add(a, b):\n    return a + b", "entry_point": "add"},
    {"instruction": "Write a python function that returns the longest word in a sentence, ties to the first.",
     "output": "...", "code": "def longest(s):\n    return max(s.split(), key=len)", "entry_point": "longest"},
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """The tiny LLaDA tokenizer (byte-level BPE, LLaDA's specials and chat template), compact layout."""
    from prism_ds.models.tiny_llada import build_tokenizer as build_llada_tokenizer

    out = tmp_path_factory.mktemp("bpe")
    build_llada_tokenizer(out, compact=True)
    return str(out)


def code_cfg(src, tok_dir, **extra):
    values = dict(prompt_format="prism_code", prompt_field="instruction", solution_field="code") | extra
    return text_config(src, tok_dir, **values)


def test_the_instruction_is_the_authors_string_verbatim():
    # Pinned: any edit of the constant changes the tokens the model is fine-tuned and evaluated on.
    assert hashlib.sha256(PRISM_CODE_INSTRUCTION.encode()).hexdigest() == \
        "6addf3d036ca1262e78a7ed3ff09e850ca67f643fc91809931caf9af13e9e692"
    if AUTHORS.exists():  # and, where the authors' mirror is at hand, equal to their INSTRUCTION
        import ast

        source = subprocess.run(["git", "-C", str(AUTHORS), "show", "HEAD:PRISM_llada/train.py"], check=True,
                                capture_output=True, text=True).stdout
        theirs = next(n.value.value for n in ast.parse(source).body
                      if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "INSTRUCTION")
        assert PRISM_CODE_INSTRUCTION == theirs


def test_prism_code_training_rows_are_the_authors_token_sequence(bpe_dir, tmp_path):
    src = write_jsonl(tmp_path / "opc.jsonl", ROWS)
    L = 320
    cfg = code_cfg(src, bpe_dir, max_length=L)
    batch = next(iter(PromptSolutionStream(cfg, load_tokenizer(cfg), micro_batch_size=2)))
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    for i, row in enumerate(ROWS):  # built plainly, as the authors' code_utils.load_opc_dataset does
        prompt = tok(PRISM_CODE_INSTRUCTION.format(task_text=row["instruction"], func_name=row["entry_point"]),
                     add_special_tokens=False)["input_ids"]
        code = tok("\n" + "<py>" + "\n" + row["code"] + "\n" + "</py>", add_special_tokens=False)["input_ids"]
        expected = prompt + code + [tok.eos_token_id] * (L - len(prompt) - len(code))
        assert batch.x[i].tolist() == expected
        assert batch.fixed[i].tolist() == [True] * len(prompt) + [False] * (L - len(prompt))
        assert batch.answer_len[i] == L - len(prompt)
    assert tok.bos_token_id not in batch.x.tolist()[0] + batch.x.tolist()[1]  # no BOS, no chat template
    assert batch.fixed.sum(1).tolist()[0] != batch.fixed.sum(1).tolist()[1]  # prompts of different lengths


def test_code_eval_renders_mbpp_with_the_training_definition(bpe_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    row = json.loads(MBPP.read_text().splitlines()[1]) if MBPP.exists() else {
        "task_id": 2, "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\r\n  return tuple(set(test_tup1) & set(test_tup2))",
        "test_list": ["assert similar_elements((3, 4), (4, 5)) == (4,)"], "test_setup_code": ""}
    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", [row])
    cfg = RunConfig()
    cfg.codeeval.mbpp_path = mbpp
    task = load_tasks("mbpp", cfg.codeeval)[0]
    assert (task.task_text, task.func_name) == (row["text"], "similar_elements")
    text_cfg = code_cfg("unused", bpe_dir)
    ids = task_prompt_ids(tok, task, text_cfg)
    # The same ids a training row with this task text and entry point gets (the prompt part of its sequence).
    src = write_jsonl(tmp_path / "train.jsonl", [{"instruction": row["text"], "code": row["code"],
                                                  "entry_point": "similar_elements"}])
    train = next(iter(PromptSolutionStream(code_cfg(src, bpe_dir, max_length=256), tok, 1)))
    assert ids == train.x[0, :int(train.fixed[0].sum())].tolist()
    assert ids == prompt_ids(tok, "prism_code", row["text"], "similar_elements")
    assert "assert" not in tok.decode(ids) and tok.bos_token_id not in ids  # the authors' MBPP prompt: no tests
    # Other formats keep code-eval's user message through encode_prompt (today's behaviour).
    auto = task_prompt_ids(tok, task, text_config("unused", bpe_dir))
    assert auto == encode_prompt(tok, [{"role": "user", "content": task.instruction}], task.instruction)
    assert auto[0] == tok.bos_token_id
    # HumanEval (and the evalplus sets) give their prompt and entry point.
    he = load_tasks("humaneval", cfg.codeeval)[0]
    assert (he.task_text, he.func_name) == (he.prompt_code.strip(), he.entry_point) and he.func_name
    assert task_prompt_ids(tok, he, text_cfg) == prompt_ids(tok, "prism_code", he.task_text, he.entry_point)
    with pytest.raises(ValueError, match="task 7: text.prompt_format=prism_code needs a task text and a function"):
        task_prompt_ids(tok, CodeTask(7, "x", task_text="a task"), text_cfg)


@needs_mbpp
def test_mbpp_function_names_come_from_the_reference_code():
    rows = {r["task_id"]: r for r in map(json.loads, MBPP.read_text().splitlines())}
    assert first_function_name(rows[1]["code"]) == "min_cost"  # after a top-level `R = 3`
    assert first_function_name(rows[2]["code"]) == "similar_elements"
    assert first_function_name(rows[3]["code"]) == "is_not_prime"  # after `import math`
    # The authors' rule takes the first function even when the tests call a later one (helper first).
    assert first_function_name(rows[6]["code"]) == "is_Power_Of_Two"
    assert "differ_At_One_Bit_Pos(" in rows[6]["test_list"][0]
    # Code that does not parse: the first `def name(` line.
    broken = rows[2]["code"] + "\r\nprint 'python 2'"
    with pytest.raises(SyntaxError):
        compile(broken, "mbpp", "exec")
    assert first_function_name(broken) == "similar_elements"
    assert first_function_name("x = (\ndef f(a):") == "f"
    assert first_function_name("class A:\n    def f(self): pass") is None
    assert first_function_name("print 'no function'") is None


def test_chat_and_template_formats(tmp_path, bpe_dir):
    tok = AutoTokenizer.from_pretrained(bpe_dir)  # has a chat template
    assert prompt_ids(tok, "chat", "add 1", template="Q: {prompt}") == prompt_ids(tok, "auto", "add 1")
    forced = prompt_ids(tok, "template", "add 1", template="Q: {prompt}\nA: ")
    assert forced == [tok.bos_token_id] + tok("Q: add 1\nA: ", add_special_tokens=False)["input_ids"]
    assert solution_text("auto", "x = 1") == "x = 1" and solution_text("prism_code", "x = 1") == "\n<py>\nx = 1\n</py>"
    plain = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "plain"))  # no chat template
    assert prompt_ids(plain, "auto", "what is 1", template="question {prompt}") == \
        prompt_ids(plain, "template", "what is 1", template="question {prompt}")


def test_bad_prompt_format_values_are_named(tmp_path, bpe_dir):
    plain = build_tokenizer(tmp_path / "plain")
    src = write_jsonl(tmp_path / "opc.jsonl", ROWS)

    def stream(cfg):
        return PromptSolutionStream(cfg, load_tokenizer(cfg), 2)

    with pytest.raises(ConfigError, match="text.prompt_format: expected one of auto, chat, template, prism_code, "
                                          "got 'code'"):
        stream(code_cfg(src, bpe_dir, prompt_format="code"))
    with pytest.raises(ConfigError, match="text.prompt_format=chat: the tokenizer has no chat template"):
        stream(text_config(src, plain, prompt_format="chat", prompt_field="instruction", solution_field="code"))
    with pytest.raises(ConfigError, match="prism_code .* unset text.messages_field"):
        stream(code_cfg(src, bpe_dir, messages_field="messages"))
    with pytest.raises(ConfigError, match="text.entry_point_field: empty"):
        stream(code_cfg(src, bpe_dir, entry_point_field=""))
    # Rows: a missing or empty entry point names the file and line; other formats never read the column.
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "entry_point"}])
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing column\(s\) 'entry_point'"):
        next(iter(stream(code_cfg(bad, bpe_dir, max_length=256))))
    empty = write_jsonl(tmp_path / "empty.jsonl", [ROWS[0], ROWS[0] | {"entry_point": " "}])
    with pytest.raises(ValueError, match=r"empty.jsonl, line 2: empty entry point \(column 'entry_point'\)"):
        next(iter(stream(code_cfg(empty, bpe_dir, max_length=256))))
    ok = text_config(bad, bpe_dir, max_length=256, prompt_field="instruction", solution_field="code")
    assert next(iter(stream(ok))).x.shape == (2, 256)
