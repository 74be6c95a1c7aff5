"""Fuzzing what users and files feed diffopt (hypothesis; the whole file runs in well under 30 s).

* every numeric flag of every command: any text is either parsed into a value the run accepts
  (checked against the library's own validation for ``diffopt train``) or refused by argparse
  with status 2 and one line naming the flag — never a traceback;
* the file loaders (training checkpoints, learned-rule files, PNG images): a valid file cut at
  any length, with any bytes overwritten, or random bytes, loads or is refused with the loader's
  own error in one line — never another exception, never torch's ``weights_only=False`` advice.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffopt.cli import _types, build_parser
from diffopt.errors import CheckpointError, LearnedRuleError, PngError
from diffopt.tasks import read_png, write_png
from diffopt.training import load_checkpoint, save_checkpoint
from diffopt.training.experiment import TrainSettings
from diffopt.training.trainer import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def numeric_flags() -> list[tuple[str, str, object]]:
    """(command, flag, type) for every option whose type is one of :mod:`diffopt.cli._types`."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            kind = action.type
            if kind is not None and getattr(kind, "__module__", "") == _types.__name__ and action.option_strings:
                found.append((name, action.option_strings[0], kind))
    return found


FLAGS = numeric_flags()
REQUIRED = {"diagnose": ["run.pt"], "train-optimizer": ["-o", "rule.pt"]}
# train flags that apply only to some task families (the default, sinusoid, refuses them): the family they need
TRAIN_TASK = {"--ways": "synthetic", "--omniglot-train-classes": "omniglot"}

values = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "-inf", "1e400", "0x10", "1_000", "١٢", "2.5", "-0", "+3", "1,2", ",", "0,,1"]),
    st.text(max_size=12),
)


def test_every_command_has_checked_numeric_flags():
    commands = {command for command, _, _ in FLAGS}
    assert commands == {"demo", "train", "check", "diagnose", "train-optimizer", "bench"}
    assert len(FLAGS) >= 50


@FUZZ
@given(choice=st.sampled_from(FLAGS), text=values)
def test_numeric_flags_parse_to_usable_values_or_name_the_flag(choice, text):
    command, flag, kind = choice
    argv = [command, *REQUIRED.get(command, []), *(["--task", TRAIN_TASK[flag]] if command == "train"
                                                   and flag in TRAIN_TASK else []), f"{flag}={text}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:
            assert exit_.code == 2
            message = err.getvalue()
            assert f"argument {flag}" in message and "Traceback" not in message
            return
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    rule = kind.__name__  # "integer >= 1", "number > 0", "number >= 0", "seed", "int_list"
    if kind is _types.int_list:
        assert value and all(isinstance(v, int) and v >= 0 for v in value)
    elif kind is _types.seed:
        assert isinstance(value, int) and 0 <= value < 2**63
    elif rule.startswith("integer >= "):
        assert isinstance(value, int) and value >= int(rule.split(">= ")[1])
    else:
        bound = float(rule.split()[-1])
        assert math.isfinite(value) and (value > bound if " > " in rule else value >= bound)
    if command == "train":  # what the parser lets through, the library accepts
        from diffopt.cli.train import settings_from_args

        settings_from_args(args).validate()


def test_train_settings_defaults_are_valid():
    TrainSettings().validate()


# -- file loaders --------------------------------------------------------------------------------------
def mutations():
    return st.one_of(
        st.tuples(st.just("cut"), st.floats(0, 1)),
        st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("random"), st.binary(max_size=300)),
    )


def mutate(data: bytes, mutation) -> bytes:
    if mutation[0] == "cut":
        return data[: int(mutation[1] * len(data))]
    if mutation[0] == "overwrite":
        at = int(mutation[1] * max(len(data) - 1, 0))
        return data[:at] + mutation[2] + data[at + len(mutation[2]):]
    return mutation[1]


@functools.cache
def valid_files() -> dict[str, bytes]:
    """A valid checkpoint, learned-rule file and PNG, as bytes (built once)."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        save_checkpoint(folder / "checkpoint.pt", {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": {"seed": 0}, "iteration": 3,
            "learner": {"w": torch.randn(4, 3)}, "optimizer": {"state": {}, "param_groups": []},
            "rng": torch.get_rng_state(),
        })
        from diffopt.optim import learned

        learned.save(learned.MLPOptimizer(torch.nn.Linear(3, 1).parameters(), hidden=(4,)), folder / "rule.pt")
        return {
            "checkpoint": (folder / "checkpoint.pt").read_bytes(),
            "rule": (folder / "rule.pt").read_bytes(),
            "png": write_png(np.arange(48, dtype=np.uint8).reshape(6, 8), filter_type="cycle"),
        }


def one_line(error: BaseException) -> None:
    text = str(error)
    assert "\n" not in text and "weights_only" not in text, text


@FUZZ
@given(mutation=mutations())
def test_a_damaged_checkpoint_loads_or_is_refused_in_one_line(tmp_path, mutation):
    path = tmp_path / "damaged.pt"
    path.write_bytes(mutate(valid_files()["checkpoint"], mutation))
    try:
        payload = load_checkpoint(path)
    except CheckpointError as error:
        one_line(error)
    else:
        assert payload["iteration"] == 3 and torch.isfinite(payload["learner"]["w"]).all()


@FUZZ
@given(mutation=mutations())
def test_a_damaged_rule_file_loads_or_is_refused_in_one_line(tmp_path, mutation):
    from diffopt.optim import learned

    path = tmp_path / "damaged.pt"
    path.write_bytes(mutate(valid_files()["rule"], mutation))
    try:
        learned.load(path, torch.nn.Linear(3, 1).parameters())
    except LearnedRuleError as error:
        one_line(error)


@FUZZ
@given(mutation=mutations())
def test_a_damaged_png_reads_or_is_refused(mutation):
    try:
        image = read_png(mutate(valid_files()["png"], mutation), max_pixels=10_000)
    except PngError as error:
        one_line(error)
    else:
        assert image.size <= 10_000 * 4
