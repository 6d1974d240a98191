"""The lm-eval model ``asarm``: exact scoring against one-pass-per-token references, rolling windows,
generation with stop sequences, and lm-eval end to end on local task YAMLs (no network)."""

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from asarm.eval.lm_eval_model import ASARMLM, _cut, main  # noqa: E402
from asarm.eval.lm_tasks import split_last_word  # noqa: E402
from asarm.model import ASARM  # noqa: E402
from asarm.tokenization import encode_text  # noqa: E402

from helpers import greedy_decode  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["asarm_lambada_local", "asarm_hellaswag_local", "asarm_rolling_local", "asarm_generate_local"]


@pytest.fixture(scope="module")
def model(xlnet_tokenizer):
    return ASARM.from_config(tokenizer=xlnet_tokenizer, d_model=16, n_layer=1, n_head=2, d_inner=32, seed=0,
                             device="cpu")


def _requests(*args):
    return [types.SimpleNamespace(args=a) for a in args]


def _hand_log_likelihood(model, context, target):
    """Sum of single-query oracle conditionals, one forward pass per target token, left to right."""
    total = 0.0
    for i, tok in enumerate(target):
        tokens = torch.tensor([context + target[:i] + [model.mask_token_id]])
        sigma = torch.arange(tokens.shape[1])[None]
        logp = model.log_probs(tokens, sigma, torch.tensor([len(context)]), torch.tensor([[tokens.shape[1] - 1]]))
        total += float(logp[0, 0, tok])
    return total


def test_registered_with_lm_eval():
    assert lm_eval.api.registry.get_model("asarm") is ASARMLM


@pytest.mark.parametrize("passage", ["He opened the door and saw his dog",
                                     'She whispered, "never again." Then she left "home."',
                                     "Tabs\tand  double  spaces   are gone"])
def test_encode_pair_matches_the_whole_passage(model, xlnet_tokenizer, passage):
    lm = ASARMLM(model=model)
    ex = split_last_word(passage)
    context, target = lm.encode_pair(ex.context, " " + ex.target)
    assert context + target == encode_text(passage, xlnet_tokenizer)
    assert lm.encode_pair(ex.context + " ", ex.target) == (context, target)  # trailing space moves over
    assert lm.encode_pair("", "word")[0] == [lm.eot_token_id]


def test_loglikelihood_is_exact_and_batch_invariant(model):
    lm = ASARMLM(model=model, batch_size=2)
    reqs = _requests(("The cat sat on the", " mat"), ("He said", " hello there, friend"), ("A", " b c d e"),
                     ("Nothing", ""))
    results = lm.loglikelihood(reqs)
    alone = ASARMLM(model=model, batch_size=1).loglikelihood(reqs)
    assert [r[0] for r in results] == pytest.approx([r[0] for r in alone], abs=1e-6)
    assert [r[1] for r in results] == [r[1] for r in alone]
    assert results[3] == (0.0, True)
    for req, (ll, greedy) in zip(reqs[:3], results):
        context, target = lm.encode_pair(*req.args)
        assert ll == pytest.approx(_hand_log_likelihood(model, context, target), abs=1e-6)
        assert greedy == (greedy_decode(model, context, len(target)) == target)
    # a continuation greedy does reproduce
    context = lm.tok_encode("The cat sat on the")
    text = lm.tok_decode(greedy_decode(model, context, 3))
    ((ll, greedy),) = lm.loglikelihood(_requests(("The cat sat on the", " " + text)))
    assert greedy == (lm.encode_pair("The cat sat on the", " " + text)[1] == greedy_decode(model, context, 3))


def test_any_permutation_order_is_seeded(model):
    reqs = _requests(("The cat sat on the", " mat and then the dog"))
    a = ASARMLM(model=model, order="any_permutation").loglikelihood(reqs)
    assert a == ASARMLM(model=model, order="any_permutation").loglikelihood(reqs)
    assert a[0][0] != pytest.approx(ASARMLM(model=model).loglikelihood(reqs)[0][0], abs=1e-9)


def test_windows_cover_the_targets():
    lm = ASARMLM.__new__(ASARMLM)
    lm.max_length, lm.rolling_context = 8, 3
    targets = list(range(100, 120))
    rows = lm.windows([2], targets)
    assert [t for _, t in rows for t in t] == targets
    assert all(len(c) + len(t) <= 8 and len(c) >= 1 for c, t in rows)
    full = [2] + targets
    for c, t in rows:  # each row sees the tokens just before its targets, at least rolling_context of them
        start = full.index(t[0])
        assert c == full[start - len(c):start] and (len(c) >= 3 or start < 3)
    assert rows[0] == ([2], targets[:7])
    assert lm.windows(list(range(20)), [1, 2]) == [(list(range(14, 20)), [1, 2])]  # long context: last tokens


def test_loglikelihood_rolling(model):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    lm = ASARMLM(model=model, max_length=8, rolling_context=3)
    tokens = lm.tok_encode(text)
    assert len(tokens) > 8
    (rolled,) = lm.loglikelihood_rolling(_requests((text,)))
    assert rolled == pytest.approx(sum(_hand_log_likelihood(model, c, t) for c, t in lm.windows([2], tokens)),
                                   abs=1e-6)
    # within the window: the exact left-to-right log-likelihood of the whole text after </s>
    (whole,) = ASARMLM(model=model, max_length=64).loglikelihood_rolling(_requests((text,)))
    assert whole == pytest.approx(_hand_log_likelihood(model, [lm.eot_token_id], tokens), abs=1e-6)


def test_cut_at_the_first_stop_sequence():
    assert _cut("abc. def\nx", [".", "\n"]) == "abc"
    assert _cut("abc\n. def", [".", "\n"]) == "abc"
    assert _cut("abc", []) == "abc"


@pytest.mark.parametrize("sampler", ["sequential", "assd-self", "assd-fused", "assd-auto"])
def test_generate_until_samplers_and_stop_sequences(model, sampler):
    lm = ASARMLM(model=model, sampler=sampler, k=2, max_gen_toks=6, batch_size=2)
    contexts = ["The cat sat on the", "Once upon a time", "He said"]
    free = lm.generate_until(_requests(*[(c, {"until": []}) for c in contexts]))
    assert all(free) and len(free) == 3
    # the same seed gives the same text, alone or in another batch (not assd-auto: its schedule is chosen for the
    # batch, so a row's sample depends on the batch; its distribution does not); another seed another text
    if sampler != "assd-auto":
        assert lm.generate_until(_requests((contexts[1], {"until": []}))) == [free[1]]
    assert lm.generate_until(_requests(*[(c, {"until": []}) for c in contexts])) == free
    other = lm.generate_until(_requests(*[(c, {"until": [], "seed": 7}) for c in contexts]))
    assert other != free
    # a stop sequence taken from the free text cuts it there
    stop = free[0].strip().split(" ")[-1][-2:]
    stopped = lm.generate_until(_requests((contexts[0], {"until": [stop]})))[0]
    assert stop not in stopped
    if sampler != "assd-auto":  # (alone, assd-auto draws another text)
        assert stopped == free[0][:free[0].find(stop)]


def test_generate_until_greedy(model):
    lm = ASARMLM(model=model, max_gen_toks=5)
    (text,) = lm.generate_until(_requests(("The cat sat on the", {"until": [], "do_sample": False})))
    context = lm.tok_encode("The cat sat on the")
    assert text == lm.tok_decode(greedy_decode(model, context, 5))
    assert lm.generate_until(_requests(("The cat sat on the", {"until": [], "temperature": 0})))[0] == text
    with pytest.raises(ValueError, match="sampler"):
        lm.generate_until(_requests(("x", {"sampler": "nope"})))


def test_simple_evaluate_on_local_tasks_agrees_with_hand_scores(model, tiny_model_dir, monkeypatch):
    """lm-eval end to end on four local task YAMLs (lambada_openai-, hellaswag-, wikitext- and generation-
    style) over docs.jsonl; LAMBADA and HellaSwag numbers agree with one-pass-per-token scoring."""
    monkeypatch.chdir(DATA)  # the YAMLs name docs.jsonl relative to the working directory
    results = lm_eval.simple_evaluate(
        model="asarm", model_args=f"pretrained={tiny_model_dir},max_length=64,max_gen_toks=4,sampler=assd-self,k=2",
        device="cpu", batch_size=4, tasks=TASKS, task_manager=lm_eval.tasks.TaskManager(include_path=str(DATA)),
        log_samples=True, bootstrap_iters=0)
    docs = [json.loads(line) for line in (DATA / "docs.jsonl").read_text().splitlines()]
    lm = ASARMLM(model=model)  # the same weights as tiny_model_dir
    res = results["results"]

    lls, correct = [], []
    for doc in docs:
        ex = split_last_word(doc["text"])
        context, target = lm.encode_pair(ex.context, " " + ex.target)
        lls.append(_hand_log_likelihood(model, context, target))
        correct.append(greedy_decode(model, context, len(target)) == target)
    assert res["asarm_lambada_local"]["perplexity,none"] == pytest.approx(np.exp(-np.mean(lls)), rel=1e-5)
    assert res["asarm_lambada_local"]["acc,none"] == pytest.approx(np.mean(correct))

    scores = np.array([[_hand_log_likelihood(model, *lm.encode_pair(d["ctx"], " " + e)) for e in d["endings"]]
                       for d in docs])
    labels = np.array([int(d["label"]) for d in docs])
    chars = np.array([[len(e) for e in d["endings"]] for d in docs])
    assert res["asarm_hellaswag_local"]["acc,none"] == pytest.approx(np.mean(scores.argmax(1) == labels))
    assert res["asarm_hellaswag_local"]["acc_norm,none"] == pytest.approx(
        np.mean((scores / chars).argmax(1) == labels))

    rolled = [_hand_log_likelihood(model, [lm.eot_token_id], lm.tok_encode(d["text"])) for d in docs]
    words = sum(len(d["text"].split()) for d in docs)
    assert res["asarm_rolling_local"]["word_perplexity,none"] == pytest.approx(np.exp(-sum(rolled) / words), rel=1e-5)

    generated = [s["filtered_resps"][0] for s in results["samples"]["asarm_generate_local"]]
    assert len(generated) == 3 and not any("." in g or "\n" in g for g in generated)


def test_cli_wrapper_registers_and_runs_lm_eval(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(DATA)
    out = tmp_path / "out"
    main(["--model", "asarm", "--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu",
          "--tasks", "asarm_lambada_local", "--include_path", str(DATA), "--output_path", str(out)])
    written = [p for p in out.rglob("results*.json")]
    assert written and "asarm_lambada_local" in json.loads(written[0].read_text())["results"]
    assert os.getcwd() == str(DATA)


def test_cli_without_device_falls_back_to_the_cpu(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """lm-eval's CLI passes device "cuda" when --device is not given; on a machine without CUDA the model
    runs on the CPU after one warning line, as lm-eval's own Hugging Face model does."""
    monkeypatch.chdir(DATA)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    main(["--model", "asarm", "--model_args", f"pretrained={tiny_model_dir}", "--tasks", "asarm_lambada_local",
          "--include_path", str(DATA), "--output_path", str(out)])
    assert [p for p in out.rglob("results*.json")]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "requested but CUDA is not available" in line]
    assert len(warnings) == 1 and warnings[0].endswith("using the CPU")
