"""Packaging: the core dependencies of pyproject.toml are enough to import asarm and sample; what only
training or evaluation needs lives in the extras and is imported lazily."""

import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Import names of the packages that only the extras (train, eval, dev, wandb) install.
EXTRA_MODULES = {"accelerate", "datasets", "tensorboard", "rouge_score", "matplotlib", "pytest", "ruff", "lm_eval",
                 "wandb"}

# Any `import X` / `from X import ...` executed by asarm's own code raises for X in EXTRA_MODULES (imports
# that transformers makes for itself are left alone), then the embedded model samples through the CLI.
CORE_ONLY = textwrap.dedent("""
    import builtins, sys
    blocked, real_import = set(sys.argv[1].split(",")), builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__", "")
        if level == 0 and importer.split(".")[0] == "asarm" and name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{importer} imports {name}, which only an extra installs")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import
    import asarm.sampling, asarm.eval.stats, asarm.eval.arguments, asarm.eval.record
    from asarm.cli import main
    sys.exit(main(["sample", "--text", "The cat <mask:3> on the mat.", "--k", "2", "--device", "cpu",
                   "--no-progress"]))
""")


def test_sampling_needs_only_the_core_dependencies():
    done = subprocess.run([sys.executable, "-c", CORE_ONLY, ",".join(sorted(EXTRA_MODULES))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nfe=" in done.stdout


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _ci_requirements() -> list[str]:
    """The lines of requirements.txt as pip reads them (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


def _names(requirements) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _torch_requirement(requirements) -> Requirement:
    """The one torch requirement among ``requirements`` (pip options such as ``-e`` skipped)."""
    (torch_requirement,) = [requirement for requirement in map(Requirement, (r for r in requirements if r[0] != "-"))
                            if requirement.name == "torch"]
    return torch_requirement


def test_the_library_keeps_any_torch_from_2_1_and_ci_installs_one_pinned_build():
    library_torch = _torch_requirement(_project()["dependencies"])
    # what pip decides for an installed torch: a CUDA build installed first (a local version) is kept
    for installed in ("2.1.0", "2.4.1+cu121", "2.13.0+cpu"):
        assert library_torch.specifier.contains(installed), installed
    assert not library_torch.specifier.contains("2.0.1")
    (pin,) = _torch_requirement(_ci_requirements()).specifier
    assert pin.operator == "==" and library_torch.specifier.contains(pin.version)  # one build, which the library takes


def test_ci_installs_every_extra_and_the_core_installs_none_of_their_packages():
    project = _project()
    extras = project["optional-dependencies"]
    assert {"train", "eval", "dev", "wandb"} <= set(extras)  # the names the README and error messages give
    (editable,) = [r for r in _ci_requirements() if r.startswith("-e ")]
    # `-e .[a,b]` read as pip reads the extras of a requirement; pip only warns about an extra that does not exist
    assert Requirement("asarm" + editable.removeprefix("-e .")).extras == set(extras)
    extra_packages = _names(r for requirements in extras.values() for r in requirements)
    assert not _names(project["dependencies"]) & extra_packages  # `pip install -e .` installs none of them


def test_ci_script_lints_then_runs_the_readme_test_command(tmp_path):
    # .ci/run with `python3` stubbed to log its arguments: install, lint, then exactly the README's command.
    log, stub = tmp_path / "calls", tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    # then the lowest-transformers job, which stops here: the stub makes no venv
    subprocess.run(["bash", str(ROOT / ".ci" / "run")], timeout=60, env={"PATH": f"{stub.parent}:/usr/bin:/bin"})
    calls = log.read_text().splitlines()
    assert calls[:3] == [
        "-m pip install -q --disable-pip-version-check -r requirements.txt", "-m ruff check .",
        "-m pytest -q -m not slow"]
    assert calls[3].startswith("-m venv --system-site-packages") and len(calls) == 4
    # the test command README.md gives (its first `python3 -m pytest` line), as the shell splits it, is the one CI ran
    readme_command = next(shlex.split(line, comments=True) for line in (ROOT / "README.md").read_text().splitlines()
                          if line.startswith("python3 -m pytest"))
    assert readme_command[0] == "python3" and " ".join(readme_command[1:]) == calls[2]
