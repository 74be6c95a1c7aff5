"""Every ```python block of README.md runs as written, without a warning.

Each block is executed in a fresh namespace (``exec`` in this process: the imports are shared,
the names are not, so a block that forgets an import or a variable fails), in a temporary working
directory (the Trainer and learned-rule blocks write files), with every warning an error except the
third-party deprecations listed in ``KNOWN_THIRD_PARTY_WARNINGS``. A block may be scaled down only by
the textual substitutions in ``SUBSTITUTIONS``, each of which must match exactly once.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# (heading of the block, text in the block, replacement, why). Keep this list short.
SUBSTITUTIONS = [
    ("Algorithms, tasks and training", "iterations=10_000", "iterations=3",
     "10 000 MAML meta-iterations take about a minute; three exercise the same loop, checkpoint and evaluation"),
]

# (message regex, category, who emits it). Everything else a block warns is an error.
KNOWN_THIRD_PARTY_WARNINGS = [
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning,
     "peft.get_peft_model reads transformers' deprecated PreTrainedModel.is_gradient_checkpointing"),
]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def readme_blocks() -> list[tuple[str, str]]:
    """``(heading above the block, code)`` for every ```python block, in order."""
    blocks = []
    for fence in FENCE.finditer(README):
        if fence.group(1).strip() != "python":
            continue
        headings = HEADING.findall(README[: fence.start()])
        blocks.append((headings[-1] if headings else "(top)", fence.group(2)))
    return blocks


BLOCKS = readme_blocks()


def test_every_python_block_is_collected_once():
    # No block is silently skipped: every opening ```python fence is extracted, every fenced block is
    # python or bash (a ```py or ```pycon block would escape this test), the ids are unique, and
    # every substitution names a block that exists.
    assert len(BLOCKS) == README.count("```python\n") >= 10
    languages = {fence.group(1).strip() for fence in FENCE.finditer(README)}
    assert languages <= {"python", "bash"}, languages
    assert 2 * sum(1 for _ in FENCE.finditer(README)) == len(re.findall(r"^```", README, re.M)), "unbalanced fences"
    ids = [heading for heading, _ in BLOCKS]
    assert len(set(ids)) == len(ids), f"two python blocks under one heading: {ids}"
    assert {heading for heading, *_ in SUBSTITUTIONS} <= set(ids)


def scaled(heading: str, code: str) -> str:
    for where, old, new, _why in SUBSTITUTIONS:
        if where == heading:
            assert code.count(old) == 1, f"substitution {old!r} must match exactly once in the {heading!r} block"
            code = code.replace(old, new)
    return code


@pytest.mark.parametrize("heading, code", BLOCKS, ids=[heading for heading, _ in BLOCKS])
def test_readme_block_runs_as_written(heading, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    compiled = compile(scaled(heading, code), f"README.md: {heading}", "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for message, category, _who in KNOWN_THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        exec(compiled, {"__name__": "__readme__"})
