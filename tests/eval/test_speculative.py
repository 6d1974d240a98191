import argparse
import json
import subprocess
from pathlib import Path
from collections import defaultdict

import pytest
import torch

from asarm.cli import main
from asarm.eval import commands, speculative
from asarm.eval.texts import packed_text

TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. Every morning the farmer walks to "
        "the market with a basket of apples and pears, and he sells them to the people of the town.\n\n"
        "In the evening the children play football in the park while their parents talk about the weather, "
        "the harvest and the news from the city. Later the lights go out one by one.\n")
LENGTH, START_FRACTION, K = 20, 0.25, 3
VISIBLE = LENGTH - int(LENGTH * (1 - START_FRACTION))  # 5 visible, 15 generated
SAMPLERS = ("sequential", "assd-self", "assd-ngram", "assd-fused", "assd-auto")


def save_tiny_gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from asarm.eval.perplexity import entropy_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    entropy_tokenizer(None)[0].save_pretrained(path)  # GPT-2's tokenizer from the data directory
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _argv(tiny_model_dir, text_file, out, *extra):
    return ["eval", "speculative", "--model", str(tiny_model_dir), "--text-file", str(text_file), "--out", str(out),
            "--length", str(LENGTH), "--start-fraction", str(START_FRACTION), "--k", str(K), "--device", "cpu",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, text_file, tmp_path_factory):
    """One full run: 3 sequences x 2 trials, batches of 2 rows (so one batch has a single row)."""
    out = tmp_path_factory.mktemp("run")
    gpt2 = save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))
    assert main(_argv(tiny_model_dir, text_file, out, "--num-sequences", "3", "--trials", "2", "--batch-size", "2",
                      "--ppl-model", str(gpt2))) == 0
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return out, results, samples


def test_outputs_and_structure(bench_run, xlnet_tokenizer):
    out, results, samples = bench_run
    for name in ("summary.md", "nfe_wallclock.png", "acceptance_by_index.png"):
        assert (out / name).stat().st_size > 0
    assert results["files"] == ["results.json", "summary.md", "samples.jsonl", "nfe_wallclock.png",
                                "acceptance_by_index.png"]
    assert results["warnings"] == []
    metrics = results["metrics"]
    assert results["evaluation"] == "speculative" and metrics["plots"] == ["nfe_wallclock.png",
                                                                          "acceptance_by_index.png"]
    settings = metrics["settings"]
    assert (settings["visible"], settings["generated"], settings["num_sequences"]) == (VISIBLE, LENGTH - VISIBLE, 3)
    assert metrics["perplexity"]["available"] and "reason" not in metrics["perplexity"]
    assert list(metrics["samplers"]) == list(SAMPLERS)
    for name in SAMPLERS[1:]:
        ratio = metrics["samplers"][name]["wallclock_ratio"]
        assert 0 < ratio["ci95"][0] <= ratio["ratio"] <= ratio["ci95"][1]
        assert ratio["significant"] == (not ratio["ci95"][0] <= 1 <= ratio["ci95"][1])
        assert metrics["samplers"][name]["tokens_per_call_pooled"] > 0
    for name, entry in metrics["samplers"].items():
        assert entry["n_samples"] == 6
        assert set(entry["metrics"]) == set(speculative.METRICS)
        for summary in entry["metrics"].values():
            assert summary["n"] == 6 and summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
        seconds = entry["metrics"]["seconds"]  # geometric mean, log-scale interval: always positive
        assert seconds["scale"] == "log" and seconds["ci95"][0] > 0
        if name == "sequential":
            assert "acceptance_by_index" not in entry
        else:
            assert len(entry["acceptance_by_index"]) == K and len(entry["drafted_by_index"]) == K
            mine = [r for r in samples if r["sampler"] == name]
            assert entry["accepted_by_index"] == [sum(r["accepted_by_index"][i] for r in mine) for i in range(K)]
    assert metrics["samplers"]["sequential"]["metrics"]["nfe"]["mean"] == LENGTH - VISIBLE
    for comparison in ("assd-self vs sequential", "assd-ngram vs sequential"):
        tests = metrics["paired"][comparison]
        assert set(tests) == {"nfe", "seconds", "gen_ppl", "entropy"}
        assert all(t["n"] == 6 and 0 <= t["wilcoxon_pvalue"] <= 1 for t in tests.values())
    summary = (out / "summary.md").read_text()
    for text in ("NFE", "model calls", "model-free draft calls", "tokens/round", "wall-clock s", "gen. ppl", "entropy",
                 "Acceptance rate by draft index", "Paired tests", "Wilcoxon p", "verdict (5%)"):
        assert text in summary
    _assert_verdicts_follow_the_tests(summary, metrics)
    assert len(samples) == 3 * 2 * len(SAMPLERS)
    for record in samples:
        assert record["gen_ppl"] > 1 and 0 < record["entropy"] <= 8
        assert not any(t in record["text"] for t in xlnet_tokenizer.all_special_tokens)
        assert record["text"] == " ".join(record["text"].split())
        assert record["seconds"] == pytest.approx(record["batch_seconds"] / record["batch_rows"])


def _table_rows(summary, header_start):
    """The rows of the markdown table whose header starts with ``header_start``, as dicts."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _assert_verdicts_follow_the_tests(summary, metrics):
    from asarm.eval.stats import significance

    labels = {label: metric for metric, label in speculative.METRICS.items()}
    rows = _table_rows(summary, "comparison")
    assert rows
    for row in rows:
        test = metrics["paired"][row["comparison"]][labels[row["metric"]]]
        assert row["verdict (5%)"] == significance(test["t_pvalue"], test["wilcoxon_pvalue"])
    for row in _table_rows(summary, "sampler | NFE speed-up"):
        ratio = metrics["samplers"][row["sampler"]]["wallclock_ratio"]
        assert row["wall-clock ratio [95% CI]"].endswith("(not significant)") == (not ratio["significant"])


def test_paired_design(bench_run):
    _, _, samples = bench_run
    by_item = defaultdict(dict)
    for record in samples:
        by_item[record["trial"], record["sequence"]][record["sampler"]] = record
    assert len(by_item) == 6
    for item in by_item.values():
        assert set(item) == set(SAMPLERS)
        first = item["sequential"]
        assert len(first["prompt_positions"]) == VISIBLE
        for record in item.values():
            for key in ("prompt_positions", "prompt_tokens", "seed"):
                assert record[key] == first[key]
            assert [record["token_ids"][p] for p in record["prompt_positions"]] == record["prompt_tokens"]
    # Fresh orders per trial; the samplers' order in a batch is rotated.
    assert any(by_item[0, s]["sequential"]["prompt_positions"] != by_item[1, s]["sequential"]["prompt_positions"]
               for s in range(3))
    for name in SAMPLERS:
        assert len({r["run_slot"] for r in samples if r["sampler"] == name}) > 1


def test_cost_accounting(bench_run):
    _, _, samples = bench_run
    for r in samples:
        generated = r["generated_tokens"]
        assert generated == LENGTH - VISIBLE and r["model_calls"] == r["nfe"]
        assert r["tokens_per_round"] == pytest.approx(generated / r["rounds"])
        if r["sampler"] == "sequential":
            assert r["nfe"] == r["rounds"] == generated and r["model_free_draft_calls"] == 0
            assert r["drafted_by_index"] is None
            continue
        drafted, accepted = r["drafted_by_index"], r["accepted_by_index"]
        assert len(drafted) == len(accepted) == K
        assert all(a <= d for a, d in zip(accepted, drafted)) and sum(accepted) == r["accepted"]
        # Each round fixes its accepted drafts plus one residual token unless all k_eff were accepted.
        assert r["accepted"] <= generated <= r["accepted"] + r["rounds"]
        if r["sampler"] == "assd-self":
            # Draft + verify per round; a last round with one token left needs no verify pass.
            assert 2 * r["rounds"] - 1 <= r["nfe"] <= 2 * r["rounds"] and r["nfe"] <= generated
            assert drafted[0] == accepted[0] == r["rounds"] and r["model_free_draft_calls"] == 0
        elif r["sampler"] in ("assd-fused", "assd-auto"):
            # one call per round; the calls without drafts to verify (the first) draft for themselves
            assert r["nfe"] == r["rounds"] and 1 <= r["draft_calls"] <= r["rounds"]
            assert r["nfe"] <= generated and r["model_free_draft_calls"] == 0
            assert r["tokens_per_call"] == pytest.approx(generated / r["nfe"])
        else:
            assert r["nfe"] == r["rounds"] == r["model_free_draft_calls"] == drafted[0]


def test_unloadable_perplexity_model_is_recorded(tiny_model_dir, text_file, tmp_path, hub_offline, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_model_dir, text_file, out, "--num-sequences", "1", "--samplers", "sequential,assd-self",
                      "--ppl-model", "asarm-tests/no-such-lm")) == 0
    assert "WARNING: generative perplexity will not be computed" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    # the loading error is a warning, kept out of the metrics and of the summary's tables
    assert metrics["perplexity"] == {"model": "asarm-tests/no-such-lm", "available": False, "max_length": None,
                                     "stride": None}
    assert len(results["warnings"]) == 1 and "could not load perplexity model" in results["warnings"][0]
    assert "could not load" not in json.dumps(metrics)
    tables, warnings = (out / "summary.md").read_text().split("## Warnings")
    assert "could not load" not in tables and "could not load perplexity model" in warnings
    summary = tables
    assert all(entry["metrics"]["gen_ppl"] is None for entry in metrics["samplers"].values())
    assert metrics["entropy"]["available"]  # GPT-2's tokenizer from the data directory
    assert metrics["paired"]["assd-self vs sequential"]["nfe"]["skipped"].startswith("1 pair(s)")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["gen_ppl"] for r in samples] == [None, None] and all(r["entropy"] > 0 for r in samples)
    assert "not computed, see Warnings" in summary


def test_packed_text_is_the_trainer_layout(xlnet_tokenizer, text_file):
    lines = [line for line in Path(text_file).read_text().splitlines() if line.strip()]
    ids = [i for line in lines for i in xlnet_tokenizer(line, add_special_tokens=False)["input_ids"] + [2]]
    chunks = packed_text(xlnet_tokenizer, 7, text_file)
    assert chunks.shape == (len(ids) // 7, 7) and chunks.flatten().tolist() == ids[:chunks.numel()]
    assert packed_text(xlnet_tokenizer, 7, text_file, 2).tolist() == chunks[:2].tolist()
    with pytest.raises(ValueError, match="only"):
        packed_text(xlnet_tokenizer, 7, text_file, 1000)
    with pytest.raises(ValueError, match="fewer than"):
        packed_text(xlnet_tokenizer, 10_000, text_file)


def _args(**overrides):
    parser = argparse.ArgumentParser()
    commands.add_speculative_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(overrides)
    return args


def test_defaults_and_paper_visible_count():
    args = _args()
    assert (args.model, args.length, args.num_sequences, args.batch_size, args.k, args.ppl_model, args.out) == (
        "asarm-tiny", 128, 8, 1, 5, "gpt2-large", "runs/eval/speculative")
    assert commands.check_speculative(_args(length=512)) == 26


@pytest.mark.parametrize("overrides, message", [
    ({"k": 0}, "--k must be an integer >= 1"),
    ({"start_fraction": 0.0}, "--start-fraction must lie strictly between 0 and 1"),
    ({"start_fraction": 1.5}, "--start-fraction must lie strictly between 0 and 1"),
    ({"length": 1}, "--length 1 is too short"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
])
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        commands.check_speculative(_args(**overrides))


def test_bad_input_through_the_cli(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(_argv(tiny_model_dir, text_file, tmp_path, "--k", "0")) == 2
    assert "--k must be an integer >= 1" in capsys.readouterr().err
    assert main(_argv(tiny_model_dir, text_file, tmp_path, "--num-sequences", "500")) == 2
    assert "500 sequences asked for, but the text has only" in capsys.readouterr().err
    assert main(_argv(tiny_model_dir, tmp_path / "missing.txt", tmp_path)) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_argv(tiny_model_dir, text_file, tmp_path, "--num-sequences", "0"))


def _script_arguments(tmp_path, **env):
    """The arguments _run_speculative_decoding.sh passes to asarm, with `python3` stubbed to print them."""
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\nprintf "ASARM_DATA_DIR=%s\\n" "$ASARM_DATA_DIR"\n')
    stub.chmod(0o755)
    script = Path(__file__).resolve().parents[2] / "_run_speculative_decoding.sh"
    done = subprocess.run(["bash", str(script), "--engine", "full"], capture_output=True, text=True, check=True,
                          timeout=60, env={"PATH": f"{stub.parent}:/usr/bin:/bin", **env})
    *argv, data_dir = done.stdout.splitlines()
    return argv, data_dir


def _options(argv):
    assert argv[:4] == ["-m", "asarm.cli", "eval", "speculative"]
    return {argv[i]: argv[i + 1] for i in range(4, len(argv) - 1) if argv[i].startswith("--")}


def test_paper_script_passes_the_paper_settings(tmp_path):
    argv, data_dir = _script_arguments(tmp_path)
    options = _options(argv)
    assert {key: options[key] for key in ("--model", "--revision", "--length", "--start-fraction", "--k",
                                          "--temperature", "--num-sequences", "--ppl-model", "--out")} == {
        "--model": "therealgabeguo/ASARM", "--revision": "nlp", "--length": "512", "--start-fraction": "0.05",
        "--k": "5", "--temperature": "1", "--num-sequences": "all", "--ppl-model": "gpt2-large",
        "--out": "runs/eval/speculative_paper"}
    assert argv[-2:] == ["--engine", "full"] and "--device" not in options and data_dir == "ASARM_DATA_DIR="
    # the arguments it passes are accepted by the command
    parsed = _args_from(argv[4:])
    assert (parsed.num_sequences, parsed.length, parsed.engine) == (None, 512, "full")


def test_paper_script_takes_environment_overrides(tmp_path):
    argv, data_dir = _script_arguments(tmp_path, MODEL="/models/mine", REVISION="", DEVICE="cuda:1", K="3",
                                       DATA="/data")
    options = _options(argv)
    assert (options["--model"], options["--device"], options["--k"]) == ("/models/mine", "cuda:1", "3")
    assert "--revision" not in options and data_dir == "ASARM_DATA_DIR=/data"


def _args_from(argv):
    parser = argparse.ArgumentParser()
    commands.add_speculative_arguments(parser)
    return parser.parse_args(argv)


def test_draft_head_samplers(tiny_model_dir, text_file, tmp_path, capsys):
    """A head sampler on a model without a head stops in one line before decoding; a model that ships a head
    gets assd-fused-head in the default sampler list."""
    out = tmp_path / "no_head"
    assert main(_argv(tiny_model_dir, text_file, out, "--num-sequences", "1", "--samplers", "sequential,assd-head",
                      "--ppl-model", "none")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' weight-loading bar
    assert last.startswith("asarm eval speculative: error: assd-head need a draft head") and not out.exists()
    from asarm.model import ASARM
    from helpers import random_head

    model = ASARM.from_pretrained(tiny_model_dir, device="cpu")
    model.attach_draft_head(random_head(model, seed=0))
    model.save_pretrained(tmp_path / "with_head")
    assert main(_argv(tmp_path / "with_head", text_file, tmp_path / "run", "--num-sequences", "1",
                      "--ppl-model", "none")) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["metrics"]["samplers"]) == [*SAMPLERS[:4], "assd-fused-head", "assd-auto"]
    assert results["metrics"]["samplers"]["assd-fused-head"]["tokens_per_call_pooled"] >= 1
