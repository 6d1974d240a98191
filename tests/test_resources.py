"""The device and thread defaults: a missing device falls back to the CPU with one warning line, and the default
thread count follows the CPUs the process may use (affinity and cgroup quota)."""

import os
from pathlib import Path

import pytest
import torch

from asarm import resources


def test_a_missing_cuda_device_falls_back_to_the_cpu_with_one_warning(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resources.pick_device("cuda") == torch.device("cpu")
    assert resources.pick_device("cuda:1") == torch.device("cpu")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("requested but CUDA is not available" in line for line in lines)
    assert resources.pick_device(None) == torch.device("cpu")
    assert resources.pick_device("cpu") == torch.device("cpu") and capsys.readouterr().err == ""


def test_a_cuda_index_past_the_devices_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resources.pick_device("cuda:3") == torch.device("cpu")
    assert "has 1 CUDA device(s)" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", ""])
def test_a_string_that_names_no_device_is_one_line(bad):
    with pytest.raises(ValueError, match="is not a device; use cpu, cuda"):
        resources.pick_device(bad)


def test_the_model_loader_uses_the_fallback(tiny_model_dir, monkeypatch):
    from asarm.model import ASARM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ASARM.from_pretrained(str(tiny_model_dir), device="cuda").device == torch.device("cpu")


def _cgroup(tmp_path, monkeypatch, cpu_max):
    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(resources, "_CGROUP", tmp_path)


def test_available_cpus_follow_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    _cgroup(tmp_path, monkeypatch, "max 100000\n")
    assert resources.available_cpus() == 6
    _cgroup(tmp_path, monkeypatch, "250000 100000\n")  # 2.5 CPUs of quota: 3 threads
    assert resources.available_cpus() == 3
    _cgroup(tmp_path, monkeypatch, "50000 100000\n")  # half a CPU: still one thread
    assert resources.available_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    _cgroup(tmp_path, monkeypatch, "max 100000\n")
    assert resources.available_cpus() == 1


def test_cgroup_v1_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    monkeypatch.setattr(resources, "_CGROUP", tmp_path)
    assert resources.available_cpus() == 2


def test_set_threads_defaults_to_the_available_cpus(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(resources, "available_cpus", lambda: 1)
    try:
        assert resources.set_threads(None) == 1 and torch.get_num_threads() == 1
        assert resources.set_threads(2) == 2 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="--threads must be an integer >= 1, got 0"):
            resources.set_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def library_bars_restored():
    """The libraries' bars on before and after (an earlier --no-progress run in this process turned them off)."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
    yield
    transformers_logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()


@pytest.mark.parametrize("quiet", [False, True])
def test_no_progress_silences_the_loaders_bars_too(tiny_model_dir, capsys, quiet, library_bars_restored):
    from asarm.cli import main

    argv = ["sample", "--model", str(tiny_model_dir), "--text", "The <mask:2> sat.", "--threads", "1"]
    assert main(argv + (["--no-progress"] if quiet else [])) == 0
    err = capsys.readouterr().err
    assert ("Loading weights" in err) is not quiet and ("it/s]" in err or "tok/s]" in err) is not quiet, err


def test_load_warning_only_when_the_load_exceeds_the_cpus():
    assert resources.load_warning([0.3, 2.4], cpus=2) is None
    assert resources.load_warning([None, None], cpus=2) is None
    warning = resources.load_warning([1.0, 5.7], cpus=2)
    assert "5.7 on 2 CPUs" in warning and "distorted" in warning


def test_results_record_threads_and_load(tmp_path, monkeypatch, capsys):
    import json

    from asarm.eval.record import EvalRun

    loads = iter([6.0, 6.5])
    monkeypatch.setattr("asarm.eval.record.load_average", lambda: next(loads))
    monkeypatch.setattr("asarm.eval.record.load_warning", lambda values: resources.load_warning(values, cpus=2))
    run = EvalRun("x", {"out": str(tmp_path)})
    results = run.finish({}, "")
    assert results["load_average"] == {"start": 6.0, "end": 6.5}
    assert results["machine"]["torch_threads"] == torch.get_num_threads() and "available_cpus" in results["machine"]
    assert any("6.5 on 2 CPUs" in w for w in json.loads((tmp_path / "results.json").read_text())["warnings"])


def _loadavg(tmp_path, monkeypatch, running: int):
    """A /proc/loadavg whose instantaneous count says ``running`` tasks (the reader among them)."""
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        return f"0.50 0.40 0.30 {running}/200 999\n" if str(self) == "/proc/loadavg" else real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


def test_default_threads_leave_the_cpus_other_tasks_run_on(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    _cgroup(tmp_path, monkeypatch, "max 100000\n")
    _loadavg(tmp_path, monkeypatch, running=1)  # only the reader: idle
    assert resources.competing_tasks(interval_s=0) == 0 and resources.default_threads() == 4
    _loadavg(tmp_path, monkeypatch, running=3)  # two other busy tasks
    assert resources.competing_tasks(interval_s=0) == 2 and resources.default_threads() == 2
    _loadavg(tmp_path, monkeypatch, running=9)
    assert resources.default_threads() == 1


def test_a_host_count_is_not_read_under_a_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    _cgroup(tmp_path, monkeypatch, "200000 100000\n")
    _loadavg(tmp_path, monkeypatch, running=50)  # the host's tasks, not this container's
    assert resources.competing_tasks(interval_s=0) == 0 and resources.default_threads() == 2
