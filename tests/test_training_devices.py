"""What a GPU training node showed (docs/runbooks/training-node.md, "On a GPU"), held here where a
CPU can: under torchrun each process needs a GPU of its own (NCCL refuses two ranks on one GPU at
its first collective, deep in the stack); MLflow's check of the logged model runs on the CPU its pt2
weights were exported on; and a training process that fails early does not end while its import
thread is still importing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flywheel.component.log import DEVICE_VARIABLE, _cpu_prediction_device
from flywheel.component.loop import select_device
from flywheel.core.errors import FlywheelError


def test_each_process_of_a_gpu_node_takes_its_own_gpu_and_one_too_many_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device(None, 0) == torch.device("cuda", 0)
    assert select_device(None, 1) == torch.device("cuda", 1)
    with pytest.raises(FlywheelError, match=r"NCCL needs one GPU per process, so use --nproc-per-node 2 or fewer"):
        select_device(None, 2)
    assert select_device("cpu", 2) == torch.device("cpu")  # an explicit device is the caller's choice
    with pytest.raises(FlywheelError, match=r"^--device gpu is not a device: use cpu, cuda or cuda:N$"):
        select_device("gpu", 0)
    assert select_device("cuda", 1) == torch.device("cuda", 1)  # plain cuda: this process's own GPU
    with pytest.raises(FlywheelError, match=r"NCCL needs one GPU per process"):
        select_device("cuda", 2)
    assert select_device("cuda:1", 0) == torch.device("cuda", 1)  # one process: the GPU it names
    with pytest.raises(FlywheelError, match=r"--device cuda:1 names one GPU for every process of this node"):
        select_device("cuda:1", 1)


def test_the_logged_models_check_runs_on_the_cpu_and_the_environment_is_left_as_found(monkeypatch):
    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    with _cpu_prediction_device():
        assert os.environ[DEVICE_VARIABLE] == "cpu"
    assert DEVICE_VARIABLE not in os.environ
    monkeypatch.setenv(DEVICE_VARIABLE, "cuda:1")
    with pytest.raises(RuntimeError), _cpu_prediction_device():
        assert os.environ[DEVICE_VARIABLE] == "cpu"
        raise RuntimeError("the export failed")
    assert os.environ[DEVICE_VARIABLE] == "cuda:1"


def test_a_process_that_fails_early_waits_for_its_import_thread_before_it_ends(tmp_path):
    (tmp_path / "slow_import.py").write_text(textwrap.dedent("""
        import pathlib, time
        time.sleep(1.0)
        pathlib.Path(__file__).with_name("imported").write_text("done")
    """))
    script = textwrap.dedent("""
        from flywheel.component.loop import start_preload
        start_preload("slow_import")
        raise SystemExit("the tracking store failed")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}, timeout=120)
    assert proc.returncode == 1 and "the tracking store failed" in proc.stderr
    assert (tmp_path / "imported").read_text() == "done"  # the import finished before the process ended
