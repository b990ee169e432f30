"""Samples files for unconditional generation: incremental writing, exact resume, refusal of other settings."""
import inspect
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from prism_ds.textgen import samples as samples_module
from prism_ds.textgen.samples import SampleFile, fill_cell, read_samples, settings_hash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES_PY = samples_module.__file__
SETTINGS = {"policy": "prism", "steps": 16, "seed": 0, "seq_len": 8, "model": "abc123",
            "sampler": settings_hash({"eta": 0.16, "temperature": 1.0})}


def make_batch(b: int, size: int) -> list[dict]:
    """Deterministic in the batch index, as the real sampler seeded from it."""
    rng = random.Random(b)
    out = []
    for _ in range(size):
        tokens = [rng.randrange(50) for _ in range(8)]
        out.append({"tokens": tokens, "text": " ".join(f"w{t}" for t in tokens)})
    return out


class Stop(Exception):
    pass


def interrupting(after: int):
    """make_batch that fails (like a Ctrl-C) when asked for batch `after`."""
    def mb(b, size):
        if b == after:
            raise Stop
        return make_batch(b, size)
    return mb


@pytest.fixture()
def reference(tmp_path):
    path = fill_cell(tmp_path / "ref.jsonl", SETTINGS, 10, 3, make_batch, progress=False)
    return path.read_bytes()


def test_uninterrupted_file_layout(tmp_path, reference):
    settings, records = read_samples(tmp_path / "ref.jsonl")
    assert settings == {**SETTINGS, "n_samples": 10, "batch_size": 3}
    assert [r["i"] for r in records] == list(range(10))
    assert [r["batch"] for r in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert records[3]["tokens"] == make_batch(1, 3)[0]["tokens"]
    assert reference.count(b"\n") == 11


def test_interrupted_run_resumes_to_the_same_file(tmp_path, reference):
    path = tmp_path / "cell.jsonl"
    with pytest.raises(Stop):
        fill_cell(path, SETTINGS, 10, 3, interrupting(2), progress=False)
    assert len(read_samples(path)[1]) == 6  # two whole batches survived
    fill_cell(path, SETTINGS, 10, 3, make_batch, progress=False)
    assert path.read_bytes() == reference


def test_torn_last_line_and_unfinished_batch_are_dropped(tmp_path, reference):
    path = tmp_path / "cell.jsonl"
    with pytest.raises(Stop):
        fill_cell(path, SETTINGS, 10, 3, interrupting(2), progress=False)
    good = path.read_bytes()
    with path.open("ab") as fh:  # killed in the middle of writing a line
        fh.write(b'{"i": 6, "batch": 2, "tok')
    f = SampleFile(path, {**SETTINGS, "n_samples": 10, "batch_size": 3})
    assert f.done() == 6
    assert path.read_bytes() == good  # the torn bytes are gone, the next append starts on a clean line
    with path.open("ab") as fh:  # one complete line of an unfinished batch
        fh.write((json.dumps({"i": 6, "batch": 2, **make_batch(2, 3)[0]}) + "\n").encode())
    fill_cell(path, SETTINGS, 10, 3, make_batch, progress=False)
    assert path.read_bytes() == reference


def test_killed_process_resumes_to_the_same_file(tmp_path, reference):
    path = tmp_path / "cell.jsonl"
    # The child loads samples.py by path (not the prism_ds package, which imports torch): it starts in a blink.
    script = "import importlib.util, os, random, signal\n" + inspect.getsource(make_batch) + textwrap.dedent(f"""
        spec = importlib.util.spec_from_file_location("samples", {SAMPLES_PY!r})
        samples = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(samples)
        def mb(b, size):
            if b == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return make_batch(b, size)
        samples.fill_cell({str(path)!r}, {SETTINGS!r}, 10, 3, mb, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(read_samples(path)[1]) == 6
    fill_cell(path, SETTINGS, 10, 3, make_batch, progress=False)
    assert path.read_bytes() == reference


def test_other_settings_are_refused(tmp_path, reference):
    path = tmp_path / "ref.jsonl"
    with pytest.raises(ValueError, match=r"ref\.jsonl.*other settings \(seed differ\)"):
        fill_cell(path, {**SETTINGS, "seed": 1}, 10, 3, make_batch, progress=False)
    with pytest.raises(ValueError, match=r"batch_size, n_samples differ"):
        fill_cell(path, SETTINGS, 12, 4, make_batch, progress=False)
    with pytest.raises(ValueError, match="model, steps differ"):
        SampleFile(path, {**SETTINGS, "steps": 32, "model": "other", "n_samples": 10, "batch_size": 3})
    assert path.read_bytes() == reference  # a refusal never touches the file


def test_finished_file_is_reused_and_bad_batches_rejected(tmp_path, reference):
    path = tmp_path / "ref.jsonl"
    fill_cell(path, SETTINGS, 10, 3, interrupting(0), progress=False)  # nothing left to make
    assert path.read_bytes() == reference
    with pytest.raises(ValueError, match="returned 2 records, not 3"):
        fill_cell(tmp_path / "x.jsonl", SETTINGS, 10, 3, lambda b, n: make_batch(b, 2), progress=False)
    (tmp_path / "foreign.jsonl").write_text('{"task_id": 1}\n')
    with pytest.raises(ValueError, match="not a prism-ds samples file"):
        SampleFile(tmp_path / "foreign.jsonl", SETTINGS)
