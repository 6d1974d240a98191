import pytest

from asarm.eval.humaneval import (BENCHMARKS, CompletionMismatchError, InfillingProblem, build_program,
                                  evaluate_completions, extract_completion, load_problems, self_check)
from asarm.paths import DataFileNotFoundError


@pytest.mark.parametrize("name, count", [("single-line", 1033), ("multi-line", 5815), ("random-span", 1640),
                                              ("random-span-light", 164)])
def test_load_all_benchmarks(name, count):
    problems = load_problems(name)
    assert len(problems) == count
    assert len({p.task_id for p in problems}) == count
    assert all(p.prompt.strip() and p.entry_point and "def check(candidate)" in p.test for p in problems)


def test_load_first_problem_and_limit():
    problems = load_problems("single-line", limit=2)
    assert [p.task_id for p in problems] == ["SingleLineInfilling/HumanEval/0/L0",
                                             "SingleLineInfilling/HumanEval/0/L1"]
    assert problems[0].entry_point == "has_close_elements"
    assert problems[0].canonical_solution == "    for idx, elem in enumerate(numbers):\n"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown HumanEval-infilling benchmark"):
        load_problems("single_line")
    with pytest.raises(DataFileNotFoundError):
        load_problems("single-line", path=tmp_path / "nope.jsonl.gz")


def test_build_program():
    p = InfillingProblem("t", "def f():\n", "    return x\n", "    x = 1\n", "def check(c):\n    assert c() == 1\n",
                         "f")
    expected = "def f():\n    x = 1\n    return x\n\ndef check(c):\n    assert c() == 1\n\ncheck(f)"
    assert build_program(p, "    x = 1\n") == expected


@pytest.fixture(scope="module")
def real_problems():
    single = load_problems("single-line")
    with_suffix = single[0]
    without_suffix = next(p for p in single if p.suffix == "")
    light = load_problems("random-span-light", limit=1)[0]
    return [with_suffix, without_suffix, light]


def test_self_check_on_real_problems(real_problems):
    report = self_check(real_problems, workers=2)
    assert report.n_tasks == 3
    assert (report.canonical_pass_rate, report.canonical_failures) == (1.0, [])
    assert (report.empty_pass_rate, report.empty_passes) == (0.0, [])


def test_evaluate_completions_on_real_problems(real_problems):
    first, no_suffix, light = real_problems
    # first: "    for idx, elem in enumerate(numbers):\n" blanked between the docstring and the inner loop
    loop = "    while True:\n        pass\n" + first.canonical_solution
    socket = "    import socket; socket.create_connection(('example.com', 80))\n" + first.canonical_solution
    completions = {first.task_id: [first.canonical_solution, "", loop, socket],
                   no_suffix.task_id: [no_suffix.canonical_solution, ""],
                   light.task_id: [light.canonical_solution, ""]}
    report = evaluate_completions(real_problems, completions, workers=2, timeout=2.0, ks=(1, 2))
    statuses = {task: [r.status for r in rs] for task, rs in report.results.items()}
    assert statuses == {first.task_id: ["passed", "failed", "timeout", "failed"],
                        no_suffix.task_id: ["passed", "failed"],
                        light.task_id: ["passed", "failed"]}
    assert "network access is disabled" in report.results[first.task_id][3].error
    assert report.pass_at_k["pass@1"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2) / 3)
    assert report.pass_at_k["pass@2"] == pytest.approx((1 / 2 + 1 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 1/2


def test_evaluate_completions_needs_matching_tasks(real_problems):
    with pytest.raises(ValueError, match="without completions"):
        evaluate_completions(real_problems, {real_problems[0].task_id: ["pass"]})
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_completions(real_problems[:1], {real_problems[0].task_id: ["x"], "other/0": ["x"]})


def test_extract_completion_from_blank_text():
    assert extract_completion("    return x\n") == "    return x\n"
    assert extract_completion("") == ""


def test_extract_completion_from_document():
    assert extract_completion("def f():\n    x = 1\n    return x\n", "def f():\n", "    return x\n") == "    x = 1\n"
    # empty suffix: everything after the prompt (the reference returned "" here)
    assert extract_completion("def f():\n    return 1\n", "def f():\n", "") == "    return 1\n"
    # an empty blank
    assert extract_completion("ab", "a", "b") == ""


def test_extract_completion_mismatch():
    with pytest.raises(CompletionMismatchError, match="prompt: they differ at character 4"):
        extract_completion("def g():\n    pass\n", "def f():\n", "")
    with pytest.raises(CompletionMismatchError, match="suffix"):
        extract_completion("def f():\n    pass\n", "def f():\n", "return\n")
    with pytest.raises(CompletionMismatchError, match="overlap"):
        extract_completion("abc", "ab", "bc")
    assert issubclass(CompletionMismatchError, ValueError)


def test_benchmark_names():
    assert sorted(BENCHMARKS) == ["multi-line", "random-span", "random-span-light", "single-line"]
