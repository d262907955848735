"""``accelerate launch`` runs ``python -m train safeguider`` as 2 CPU processes (gloo).

In accelerate 1.15 ``accelerate launch --num_processes 2 --cpu`` starts ONE process (its simple launcher; CPU
multi-process needs mpirun and a hostfile), so the launch is ``--multi_gpu --num_processes 2`` (torchrun under
the hood); on a machine without CUDA the trainer's ``Accelerator(cpu=True)`` makes the two processes join as
MULTI_CPU with the gloo backend. A tiny setting (200 prompts, 2 epochs) into a temporary folder; the written classifier must load and the log
must record 2 processes. Manual form: train/safeguider/README.md."""

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_safeguider_two_processes(tmp_path, tinyworld_dir):
    import json

    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU (gloo) path; on a GPU machine --multi_gpu would use NCCL")

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert launcher, "accelerate is not installed (pip install -e '.[train,cpu]')"
    out = tmp_path / "sg"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train", "safeguider",
                           "--model", str(tinyworld_dir), "--out", str(out), "--prompts", "200", "--epochs", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from guards.safeguider import SafeGuiderClassifier

    model = SafeGuiderClassifier.from_pretrained(out)
    assert model.config.hidden_size == 128
    log = json.loads((out / "train_log.json").read_text())
    assert log["recipe"]["processes"] == 2 and len(log["history"]) == 2
