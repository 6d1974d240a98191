import gzip
import json
from collections import defaultdict

import pytest

from asarm import cli
from asarm.eval.code_execution import pass_at_k
from asarm.eval.humaneval import load_problems
from asarm.eval.infill import CodeCodec
from asarm.tokenization import CodeTokenizer

# Hand-made problems. "comment": the blank is the end of a comment line and the suffix is empty, so
# any one-line completion passes (and so does the empty one); "value": only the right expression passes.
HAND_MADE = [
    {"task_id": "Hand/comment", "prompt": "def f(x):\n    return x\n# note:", "suffix": "",
     "canonical_solution": " anything goes here", "test": "def check(candidate):\n    assert candidate(2) == 2\n",
     "entry_point": "f"},
    {"task_id": "Hand/value", "prompt": "def g(x):\n    return ", "suffix": "\n",
     "canonical_solution": "x * 3", "test": "def check(candidate):\n    assert candidate(2) == 6\n",
     "entry_point": "g"},
]


@pytest.fixture(scope="module")
def hand_made_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems")
    with gzip.open(path / "HumanEval-SingleLineInfilling.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in HAND_MADE)
    return path


def run_cli(*argv) -> int:
    return cli.main(["eval", "humaneval", "--no-progress", "--workers", "2", *map(str, argv)])


def read_outputs(out):
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text())["metrics"], samples


def check_pass_at_k(metrics, samples, ks):
    """Every reported pass@k is the mean over tasks of the unbiased estimator on the executed flags."""
    flags = defaultdict(list)
    for s in samples:
        flags[s["benchmark"], s["sampler"], s["task_id"]].append(s["passed"])
    for benchmark, by in metrics["results"].items():
        for sampler, m in by.items():
            tasks = [f for (b, name, _), f in flags.items() if (b, name) == (benchmark, sampler)]
            for k in ks:
                assert m[f"pass@{k}"] == pytest.approx(sum(pass_at_k(len(f), sum(f), k) for f in tasks) / len(tasks))


@pytest.fixture(scope="module")
def real_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("humaneval")
    assert run_cli("--model", tiny_model_dir, "--benchmarks", "single-line,random-span-light", "--limit", 2,
                   "--samplers", "sequential,assd-self", "--k", 4, "--num-samples", 2, "--pass-k", "1,2",
                   "--out", out) == 0
    return out, *read_outputs(out)


def test_real_problems_outputs_and_self_check(real_run, xlnet_tokenizer):
    out, metrics, samples = real_run
    assert (metrics["benchmarks"], metrics["completions_per_task"], metrics["pass_k"]) == \
        (["single-line", "random-span-light"], 2, [1, 2])
    assert metrics["code_mapping"] is True
    for benchmark in metrics["benchmarks"]:
        check = metrics["self_check"][benchmark]
        assert (check["tasks"], check["canonical_pass_rate"], check["empty_pass_rate"]) == (2, 1.0, 0.0)
        assert check["blank_roundtrip_rate"] == 1.0
        assert len(metrics["results"][benchmark]["assd-self"]["acceptance_by_index"]) == 4  # k reached ASSD
        assert "acceptance_by_index" not in metrics["results"][benchmark]["sequential"]
    assert len(samples) == 2 * 2 * 2 * 2  # benchmarks x samplers x tasks x samples
    assert set(samples[0]) >= {"benchmark", "task_id", "sampler", "sample", "completion", "passed", "status",
                               "error", "nfe"}
    codec = CodeTokenizer(xlnet_tokenizer)
    for s in samples:
        problem = next(p for p in load_problems(s["benchmark"], limit=2) if p.task_id == s["task_id"])
        assert s["blank_tokens"] == len(codec.encode_parts([problem.prompt, problem.canonical_solution])[1])
        if s["sampler"] == "sequential":
            assert s["nfe"] == s["blank_tokens"]
        assert s["passed"] == (s["status"] == "passed") and (s["passed"] or s["error"])
    check_pass_at_k(metrics, samples, [1, 2])
    summary = (out / "summary.md").read_text()
    assert "canonical pass" in summary and "| single-line | assd-self |" in summary and "pass@2 %" in summary
    assert (out / "pass_at_k.png").stat().st_size > 0


def test_empty_suffix_and_seeds_end_to_end(tiny_model_dir, hand_made_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--data-dir", hand_made_dir, "--samplers", "sequential,assd-self", "--k", 3]
    assert run_cli(*common, "--num-samples", 3, "--pass-k", "1,3", "--out", tmp_path / "a") == 0
    metrics, samples = read_outputs(tmp_path / "a")
    check = metrics["self_check"]["single-line"]
    assert (check["canonical_pass_rate"], check["blank_roundtrip_rate"]) == (1.0, 1.0)
    assert (check["empty_pass_rate"], check["empty_passes"]) == (0.5, ["Hand/comment"])  # detected, reported
    comment = [s for s in samples if s["task_id"] == "Hand/comment"]
    assert len(comment) == 6 and all(s["completion"] for s in comment)  # empty suffix: text is still extracted
    assert all(s["passed"] for s in comment if "\n" not in s["completion"])
    check_pass_at_k(metrics, samples, [1, 3])
    # sample s is seeded as trial s whatever the split into trials x samples or the batch size
    assert run_cli(*common, "--trials", 3, "--pass-k", 3, "--batch-size", 1, "--out", tmp_path / "b") == 0
    _, again = read_outputs(tmp_path / "b")
    key = lambda s: (s["sampler"], s["task_id"], s["sample"])  # noqa: E731
    assert sorted((key(s), s["completion"]) for s in again) == sorted((key(s), s["completion"]) for s in samples)


def test_no_code_mapping_and_fixed_blank(tiny_model_dir, hand_made_dir, tmp_path):
    assert run_cli("--model", tiny_model_dir, "--data-dir", hand_made_dir, "--samplers", "sequential",
                   "--no-code-mapping", "--blank-length", 2, "--out", tmp_path) == 0
    metrics, samples = read_outputs(tmp_path)
    assert metrics["code_mapping"] is False and metrics["blank"] == "fixed 2 tokens"
    assert [(s["blank_tokens"], s["nfe"]) for s in samples] == [(2, 2), (2, 2)]


def test_code_codec_round_trips_blanks(xlnet_tokenizer):
    codec = CodeCodec(xlnet_tokenizer)
    problems = [p for p in load_problems("single-line") if p.suffix == ""] + load_problems("random-span", limit=40)
    for p in problems:
        prefix, reference, _ = codec.encode_parts([p.prompt, p.canonical_solution, p.suffix])
        assert codec.decode_blank(prefix, reference) == p.canonical_solution, p.task_id
    # the blank continues a word of the prompt, or starts one after whitespace
    prefix, reference, suffix = codec.encode_parts(["x = fo", "o(1)", ""])
    assert codec.decode_blank(prefix, reference) == "o(1)" and suffix == []
    prefix, reference, _ = codec.encode_parts(["x = ", "foo", ""])
    assert codec.decode_blank(prefix, reference) == "foo"


@pytest.mark.parametrize("argv, message", [
    (["--benchmarks", "single_line"], "unknown HumanEval-infilling benchmark"),
    (["--k", "0"], "--k must be an integer >= 1"),
    (["--blank-ratio", "0"], "--blank-ratio must be > 0"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--pass-k", "2"], "--pass-k values must lie in [1, 1]"),
    (["--pass-k", "one"], "--pass-k must be comma-separated integers"),
    (["--timeout", "0"], "--timeout must be > 0"),
])
def test_bad_inputs(argv, message, tmp_path, capsys):
    assert run_cli("--model", tmp_path / "never-loaded", "--out", tmp_path, *argv) == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir(tmp_path, capsys):
    assert run_cli("--model", tmp_path / "never-loaded", "--data-dir", tmp_path, "--out", tmp_path) == 2
    assert "HumanEval-SingleLineInfilling.jsonl.gz" in capsys.readouterr().err
