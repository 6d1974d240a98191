import json

import pytest
import torch

from asarm import cli
from asarm.eval.infill import TextCodec, blank_length, encode_rows, infill, make_batch
from asarm.eval.rocstories import ROUGE_TYPES, load_infilling, rouge_scores
from asarm.sampling import SAMPLERS
from asarm.seeds import row_seeds
from asarm.model import ASARM
from asarm.tokenization import encode_text


def run_cli(*argv) -> int:
    return cli.main(["eval", "rocstories", "--no-progress", *map(str, argv)])


def read_samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def main_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rocstories")
    assert run_cli("--model", tiny_model_dir, "--limit", 2, "--samplers", "sequential,assd-self", "--k", 3,
                   "--trials", 2, "--batch-size", 3, "--out", out) == 0
    return out, json.loads((out / "results.json").read_text()), read_samples(out)


def test_outputs(main_run):
    out, results, samples = main_run
    metrics = results["metrics"]
    assert results["evaluation"] == "rocstories" and results["args"]["k"] == 3
    assert (metrics["stories"], metrics["settings"], metrics["trials"]) == (2, ["1/5", "3/5"], 2)
    assert metrics["blank"] == "reference token count"
    for setting in ("1/5", "3/5"):
        for sampler in ("sequential", "assd-self"):
            m = metrics["results"][setting][sampler]
            assert all(0 <= m[r] <= 100 for r in ROUGE_TYPES)
            assert m["rows"] == 4 and m["nfe"] >= 1 and m["tokens_per_round"] >= 1
    summary = (out / "summary.md").read_text()
    assert summary.count("| 1/5 |") == 2 and summary.count("| 3/5 |") == 2 and "tokens/round" in summary
    assert (out / "rouge.png").stat().st_size > 0
    assert len(samples) == 2 * 2 * 2 * 2  # settings x samplers x trials x stories
    assert set(samples[0]) >= {"story_id", "setting", "sampler", "trial", "prompt", "reference", "prediction",
                               "suffix", "nfe", "rouge1"}
    first = load_infilling("3/5", limit=1)[0]
    record = next(s for s in samples if s["setting"] == "3/5" and s["story_id"] == first.story_id)
    assert (record["prompt"], record["reference"], record["suffix"]) == (first.prompt, first.reference, first.suffix)


def test_blank_length_is_reference_token_count(main_run, xlnet_tokenizer):
    _, _, samples = main_run
    for s in samples:
        assert s["blank_tokens"] == len(encode_text(s["reference"], xlnet_tokenizer))
        if s["sampler"] == "sequential":
            assert s["nfe"] == s["rounds"] == s["blank_tokens"]
        else:  # ASSD with the self drafter: each 2-NFE round fixes >= 2 tokens
            assert s["nfe"] <= s["blank_tokens"]


def test_rouge_pools_trials(main_run):
    _, results, samples = main_run
    for setting, by in results["metrics"]["results"].items():
        for sampler, m in by.items():
            mine = [s for s in samples if s["setting"] == setting and s["sampler"] == sampler]
            assert sorted(s["trial"] for s in mine) == [0, 0, 1, 1]
            report = rouge_scores([s["prediction"] for s in mine], [s["reference"] for s in mine])
            assert m["rouge1"] == pytest.approx(report.mean["rouge1"])
            assert m["rougeL"] == pytest.approx(report.mean["rougeL"])


def test_k_reaches_the_sampler(main_run):
    _, results, _ = main_run
    for by in results["metrics"]["results"].values():
        assert len(by["assd-self"]["acceptance_by_index"]) == 3
        assert by["assd-self"]["acceptance_by_index"][0] == 1.0  # the first self-draft is exact
        assert "acceptance_by_index" not in by["sequential"]


def test_same_seeds_same_predictions_in_any_batch(main_run, tiny_model_dir, tmp_path):
    _, _, samples = main_run
    assert run_cli("--model", tiny_model_dir, "--limit", 2, "--settings", "1/5", "--samplers", "assd-self", "--k", 3,
                   "--batch-size", 1, "--out", tmp_path) == 0
    again = read_samples(tmp_path)
    before = [s for s in samples if s["setting"] == "1/5" and s["sampler"] == "assd-self" and s["trial"] == 0]
    assert [(s["story_id"], s["prediction"], s["nfe"]) for s in again] == \
        [(s["story_id"], s["prediction"], s["nfe"]) for s in before]
    # trial 1 has fresh seeds
    assert [s["prediction"] for s in samples if s["sampler"] == "assd-self" and s["trial"] == 1] != \
        [s["prediction"] for s in samples if s["sampler"] == "assd-self" and s["trial"] == 0]


def test_fixed_and_ratio_blank_lengths(tiny_model_dir, tmp_path, xlnet_tokenizer):
    assert run_cli("--model", tiny_model_dir, "--limit", 2, "--settings", "1/5", "--samplers", "sequential",
                   "--blank-length", 4, "--out", tmp_path / "fixed") == 0
    samples = read_samples(tmp_path / "fixed")
    assert [s["blank_tokens"] for s in samples] == [4, 4] and [s["nfe"] for s in samples] == [4, 4]
    assert run_cli("--model", tiny_model_dir, "--limit", 2, "--settings", "1/5", "--samplers", "sequential",
                   "--blank-ratio", 0.5, "--out", tmp_path / "ratio") == 0
    for s in read_samples(tmp_path / "ratio"):
        assert s["blank_tokens"] == max(1, round(0.5 * len(encode_text(s["reference"], xlnet_tokenizer))))
    assert json.loads((tmp_path / "ratio" / "results.json").read_text())["metrics"]["blank"] == "0.5 x reference tokens"


def test_blank_length_rule():
    assert blank_length(7) == 7
    assert blank_length(7, fixed=3) == 3
    assert blank_length(7, ratio=0.5) == 4 and blank_length(1, ratio=0.1) == 1 and blank_length(10, ratio=1.5) == 15


def test_decoded_rows_keep_prompt_and_suffix(tiny_model_dir):
    model = ASARM.from_pretrained(tiny_model_dir, device="cpu")
    items = load_infilling("1/5", limit=2) + load_infilling("3/5", limit=1)
    rows, references = encode_rows(TextCodec(model.tokenizer), [(it.prompt, it.reference, it.suffix) for it in items])
    assert [r.blank for r in rows] == [len(ref) for ref in references]
    tokens, sigma, n_prompt, lengths = make_batch(rows, model.tokenizer.pad_token_id, model.mask_token_id)
    assert lengths.tolist() == [r.length for r in rows] and int((tokens == model.mask_token_id).sum()) == \
        sum(r.blank for r in rows)
    # visible tokens hold the first ranks; the blank follows left to right
    for b, row in enumerate(rows):
        p = len(row.prefix)
        assert n_prompt[b] == p + len(row.suffix)
        assert sigma[b, p:p + row.blank].tolist() == list(range(int(n_prompt[b]), int(n_prompt[b]) + row.blank))
    for name in ("sequential", "assd-self", "assd-ngram"):
        out = infill(model, SAMPLERS[name].replace(k=4), rows, row_seeds(0, 0, range(len(rows))), batch_size=2,
                     engine="cached")
        for i, row in enumerate(rows):
            p = len(row.prefix)
            assert len(out.decoded[i]) == row.length
            assert tuple(out.decoded[i][:p]) == row.prefix and tuple(out.decoded[i][p + row.blank:]) == row.suffix
            assert len(out.blank(i)) == row.blank and model.mask_token_id not in out.blank(i)
        assert out.summary()["blank_tokens"] == sum(r.blank for r in rows) / len(rows)
    with pytest.raises(ValueError, match="seeds"):
        infill(model, SAMPLERS["sequential"], rows, torch.zeros(1, dtype=torch.long), batch_size=2, engine="cached")


@pytest.mark.parametrize("argv, message", [
    (["--settings", "2/5"], "unknown ROCStories setting"),
    (["--settings", ","], "unknown ROCStories setting"),
    (["--k", "0"], "--k must be an integer >= 1"),
    (["--blank-ratio", "0"], "--blank-ratio must be > 0"),
    (["--blank-ratio", "-1"], "--blank-ratio must be > 0"),
    (["--blank-length", "0"], "--blank-length must be >= 1"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--samplers", "greedy"], "unknown sampler"),
])
def test_bad_inputs(argv, message, tmp_path, capsys):
    assert run_cli("--model", tmp_path / "never-loaded", "--out", tmp_path, *argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit must be a positive integer or 'all'"),
    (["--blank-length", "3", "--blank-ratio", "0.5"], "not allowed with argument"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
