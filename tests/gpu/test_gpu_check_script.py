"""scripts/gpu_check.sh, run here without a GPU: one clear line when CUDA is absent, and (with `python3`
stubbed to log its arguments and claim a GPU) the steps it runs and the report it writes. Each logged command
is then started here as Python would start it and stopped where its work would begin: the GPU tests are
collected, the benchmarks' own parsers read their arguments, the training runs' configs are loaded."""

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asarm.training import trainer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(out, python):
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)})


def _python(argv: list[str], monkeypatch) -> None:
    """``python ARGV`` (``-m MODULE ...`` or ``SCRIPT ...``) in this process, from the repository root, as
    gpu_check.sh runs it; fails unless it exits with status 0."""
    with monkeypatch.context() as scoped:
        scoped.chdir(ROOT)
        scoped.setattr(sys, "path", list(sys.path))  # a benchmark puts its own directory first
        try:
            if argv[0] == "-m":
                scoped.delitem(sys.modules, argv[1], raising=False)  # run as __main__, not the imported module
                scoped.setattr(sys, "argv", argv[1:])
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                scoped.setattr(sys, "argv", argv)
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
        except SystemExit as exited:
            assert exited.code in (0, None), f"python {' '.join(argv)} exited with {exited.code}"


class _Parsed(Exception):
    """Raised by the parser of a benchmark with what it parsed, so that the benchmark itself never runs."""


def _benchmark_arguments(argv: list[str], monkeypatch) -> argparse.Namespace:
    """The arguments the benchmark ``python ARGV`` parses (its own parser), without running it."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(parse_args(parser, args, namespace))

    with monkeypatch.context() as scoped:
        scoped.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed) as parsed:
            _python(argv, monkeypatch)
    return parsed.value.args[0]


def _training_config(argv: list[str], monkeypatch):
    """The config the training run ``python ARGV`` would train with (it loads it, then stops)."""
    configs = []
    with monkeypatch.context() as scoped:
        scoped.setattr(trainer, "run_training", lambda cfg: configs.append(cfg) or {})
        _python(argv, monkeypatch)
    (config,) = configs
    return config


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_without_cuda_it_fails_with_one_clear_line(tmp_path):
    done = _run(tmp_path / "out", sys.executable)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU"]
    assert not (tmp_path / "out").exists()


def test_steps_and_report(tmp_path, monkeypatch):
    calls, stub = tmp_path / "calls", tmp_path / "python"
    # Claims CUDA, logs every other call, and fails the compiled training run.
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo "2.x on FakeGPU"; exit 0; fi\n'
                    f'echo "$*" >> {calls}\necho "output of $*"\n'
                    f'case "$*" in *train.compile=true*) exit 3;; esac\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    done = _run(out, stub)
    assert done.returncode == 1, done.stderr
    logged = [line.split() for line in calls.read_text().splitlines()]
    gpu_tests, bench_sampling, *training_runs, bench_backbones = logged
    # the GPU tests: every test file of tests/gpu
    collected = subprocess.run([sys.executable, *gpu_tests, "--collect-only"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-2000:]
    test_files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert test_files == {str(path.relative_to(ROOT)) for path in (ROOT / "tests" / "gpu").glob("test_*.py")}
    # the benchmarks: on the GPU, RESULTS.md untouched, the backbone benchmark without its training runs
    sampling = _benchmark_arguments(bench_sampling, monkeypatch)
    assert sampling.device == "cuda" and sampling.no_write
    backbones = _benchmark_arguments(bench_backbones, monkeypatch)
    assert backbones.device == "cuda" and backbones.no_write and backbones.skip_quality
    # 50 bf16 steps on the GPU, eager and compiled, and on the rotary backbone, each in a fresh run directory
    configs = [_training_config(argv, monkeypatch) for argv in training_runs]
    assert [(cfg.model.backbone or "xlnet", cfg.train.compile) for cfg in configs] == [
        ("xlnet", False), ("xlnet", True), ("rope", False)]
    for cfg, name in zip(configs, ("train_bf16_eager", "train_bf16_compiled", "train_rope_bf16")):
        assert (cfg.train.max_steps, cfg.train.mixed_precision, cfg.train.cpu) == (50, "bf16", False)
        assert cfg.train.run_dir == str(out / name) and cfg.train.resume == "none"
    report = (out / "report.md").read_text()
    for name, verdict in (("gpu_tests", "passed"), ("bench_sampling", "passed"), ("train_bf16_eager", "passed"),
                          ("train_bf16_compiled", "FAILED (exit 3)"), ("train_rope_bf16", "passed"),
                          ("bench_backbones", "passed")):
        assert f"## {name}: {verdict} in " in report
        assert (out / f"{name}.log").read_text().startswith("output of ")
    assert "FakeGPU" in report
