"""scripts/gpu_check.sh, run here without a GPU: one clear line when CUDA is absent, and (with `python3`
stubbed to log its arguments and claim a GPU) the steps it runs and the report it writes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(out, python):
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_without_cuda_it_fails_with_one_clear_line(tmp_path):
    done = _run(tmp_path / "out", sys.executable)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU"]
    assert not (tmp_path / "out").exists()


def test_steps_and_report(tmp_path):
    calls, stub = tmp_path / "calls", tmp_path / "python"
    # Claims CUDA, logs every other call, and fails the compiled training run.
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo "2.x on FakeGPU"; exit 0; fi\n'
                    f'echo "$*" >> {calls}\necho "output of $*"\n'
                    f'case "$*" in *train.compile=true*) exit 3;; esac\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    done = _run(out, stub)
    assert done.returncode == 1, done.stderr
    logged = calls.read_text().splitlines()
    assert logged[0] == "-m pytest -q -p no:cacheprovider tests/gpu"
    assert logged[1] == "benchmarks/bench_sampling.py --device cuda --lengths 128 512 --repeats 1 --no-write"
    for line, compiled, config in zip(logged[2:], ("false", "true", "false"), ("", "", "_rope")):
        assert line.startswith(f"-m asarm.cli train --config configs/tiny_cpu{config}.yaml")
        for option in ("train.max_steps=50", "train.mixed_precision=bf16", "train.cpu=false",
                       f"train.compile={compiled}"):
            assert option in line.split()
    assert logged[5] == "benchmarks/bench_backbones.py --device cuda --skip-quality --steps 3 --no-write"
    assert len(logged) == 6
    report = (out / "report.md").read_text()
    for name, verdict in (("gpu_tests", "passed"), ("bench_sampling", "passed"), ("train_bf16_eager", "passed"),
                          ("train_bf16_compiled", "FAILED (exit 3)"), ("train_rope_bf16", "passed"),
                          ("bench_backbones", "passed")):
        assert f"## {name}: {verdict} in " in report
        assert (out / f"{name}.log").read_text().startswith("output of ")
    assert "FakeGPU" in report
