"""Shared by the training tests: a very small GFM config and helpers to run and read a training run."""
import json
import os
from pathlib import Path

import pytest

from gfm_fast.training import train
from gfm_fast.training.distributed import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "gfm_fast" / "train.py"
# A very small GFM: 64 px images, 2x2 mask blocks of 32 px (3 of 4 masked), 1-2 blocks per stage.
TEST_MODEL = [
    "model.student.embed_dim=16", "model.student.depths=[1,1,2,1]", "model.student.num_heads=[1,2,4,8]",
    "model.student.window_size=2", "model.student.img_size=64",
    "model.teacher.embed_dim=16", "model.teacher.depths=[1,1,2,1]", "model.teacher.num_heads=[1,2,4,8]",
    "model.teacher.window_size=2", "model.teacher.img_size=64",
    "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=16", "data.samples_per_epoch=64",
    "run.log_every=1", "run.preview_every=1000", "run.ckpt_every=1000", "run.keep_last=5",
]


def overrides(tmp_path, *extra):
    items = TEST_MODEL + [f"run.output_dir={tmp_path}"] + list(extra)
    return {item.split("=", 1)[0]: item.split("=", 1)[1] for item in items}


def run_tiny(tmp_path, *extra):
    """Train TEST_MODEL in this process (random teacher) into ``tmp_path``."""
    with pytest.warns(UserWarning, match="teacher has NO weights"):
        return train("tiny", **overrides(tmp_path, *extra))


def metric(run_dir, name):
    """``{step: value}`` of one metric in a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[name] for r in map(json.loads, lines) if name in r}


def losses(run_dir):
    return metric(run_dir, "loss/total")


def subprocess_env():
    """This environment without the distributed variables in-process runs set (subprocesses get their own)."""
    env = dict(os.environ)
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    env["PYTHONWARNINGS"] = "ignore"
    return env
