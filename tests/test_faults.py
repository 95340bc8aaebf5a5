"""A native crash in a CLI run names the command and the stage in one line before the crashing
thread's trace (gradindex.faults; issue 19 item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CRASHING_TASK = '''
import ctypes
import torch
from gradindex.task import Task


class Crash(Task):
    def __init__(self):
        self.options = {}

    def train_dataset(self):
        return torch.utils.data.TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))

    def load_model(self, checkpoint=None):
        return torch.nn.Linear(3, 2)

    def compute_train_loss(self, batch, model):
        ctypes.string_at(0)  # a native crash (SIGSEGV), as a heap corruption in a kernel would give

    compute_measurement = compute_train_loss
'''


def test_a_native_crash_names_command_and_stage_before_the_trace(tmp_path):
    (tmp_path / "crash.py").write_text(CRASHING_TASK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gradindex", "-q", "featurize", f"{tmp_path}/crash.py:Crash",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    context = [i for i, line in enumerate(lines) if "[stage: featurize shard 0 (rows 0-4)]" in line]
    assert context, done.stderr
    assert f"gradindex -q featurize {tmp_path}/crash.py:Crash --out {tmp_path / 'out'}" in lines[context[0]]
    crashing = [i for i, line in enumerate(lines) if line.startswith("Current thread")]
    assert crashing and context[0] < crashing[0], done.stderr


def test_stages_are_a_no_op_without_enable():
    from gradindex import faults

    with faults.stage("anything"):
        pass
