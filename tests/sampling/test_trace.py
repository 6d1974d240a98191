"""Decode traces: they never change the samples, they account for every token and call, and they render
to a well-formed self-contained page (checked in a headless browser where one is installed)."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from asarm.cli import main
from asarm.sampling import assd_decode, sequential_decode
from asarm.sampling.trace import ORIGINS, render_html, render_text

from helpers import tiny_model
from test_decode import SAMPLERS, _batch

TRACED = dict(SAMPLERS, **{
    "assd-fused-k1": lambda m, *a, **kw: assd_decode(m, *a, k=1, fused=True, **kw),
    "assd-ngram-bonus": lambda m, *a, **kw: assd_decode(m, *a, k=3, drafter="ngram", bonus=True, **kw)})


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, init_std=0.5)


@pytest.fixture(scope="module")
def traced(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=11)
    seeds = torch.arange(200, 208)
    runs = {}
    for name, sampler in TRACED.items():
        plain = sampler(model, tokens, sigma, n_prompt, lengths, seed=seeds)
        runs[name] = (plain, sampler(model, tokens, sigma, n_prompt, lengths, seed=seeds, trace=True))
    return (tokens, sigma, n_prompt, lengths), runs


@pytest.mark.parametrize("name", list(TRACED))
def test_tracing_does_not_change_the_samples(traced, name):
    _, runs = traced
    plain, with_trace = runs[name]
    assert plain.trace is None and with_trace.trace is not None
    assert torch.equal(plain.tokens, with_trace.tokens)
    assert torch.equal(plain.nfe, with_trace.nfe) and torch.equal(plain.rounds, with_trace.rounds)


@pytest.mark.parametrize("name", list(TRACED))
def test_trace_accounts_for_every_token_call_and_draft(traced, name):
    (tokens, sigma, n_prompt, lengths), runs = traced
    _, out = runs[name]
    for b, rounds in enumerate(out.trace.rows):
        assert len(rounds) == int(out.rounds[b]) and sum(r.calls for r in rounds) == int(out.nfe[b])
        committed = [c for r in rounds for c in r.committed]
        ranks = [int(sigma[b, position]) for position, _, _ in committed]
        # every decoded rank once, in decode order, with the token the sampler returned
        assert ranks == list(range(int(n_prompt[b]), int(lengths[b])))
        assert all(int(out.tokens[b, position]) == token for position, token, _ in committed)
        origins = [origin for _, _, origin in committed]
        assert set(origins) <= set(ORIGINS) - {"prompt"}
        assert origins.count("draft") == sum(r.accepted for r in rounds) == int(out.accepted[b])
        assert all(r.accepted <= len(r.drafts) for r in rounds)
        if name == "sequential":
            assert set(origins) == {"sequential"} and all(not r.drafts for r in rounds)
        else:
            # a residual is drawn exactly where a verified draft was rejected
            assert origins.count("residual") == sum(r.accepted < len(r.drafts) for r in rounds)
            assert all(0 < q <= 1 for r in rounds for _, _, q in r.drafts)
        origin = out.trace.origin(b, tokens.shape[1])
        assert all((origin[p] == "prompt") == (int(sigma[b, p]) < int(n_prompt[b])) for p in range(tokens.shape[1]))
        assert all((origin[p] is None) == (int(sigma[b, p]) >= int(lengths[b])) for p in range(tokens.shape[1]))
        assert all(r.queried for r in rounds)  # every round made at least one model call with queries


class _Page(HTMLParser):
    """Counts what the page holds and checks that every element is closed in order."""

    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.sections, self.bars, self.classes, self.balanced = [], 0, 0, [], True
        self.text_spans, self.in_text = [], False

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag not in self.VOID:
            self.stack.append((tag, "text" in classes))
        if "text" in classes:
            self.in_text = True
            self.text_spans.append(0)
        self.sections += tag == "section" and "row" in classes
        self.bars += "bar" in classes
        if "tok" in classes:
            self.classes.append(classes[1])
            if self.in_text:
                self.text_spans[-1] += 1

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1][0] != tag:
            self.balanced = False
            return
        _, was_text = self.stack.pop()
        self.in_text = self.in_text and not was_text


def test_html_page_structure(traced, model):
    (tokens, _, _, _), runs = traced
    _, out = runs["assd-fused"]
    page = render_html(out.trace, out.tokens, tokenizer=None)
    parsed = _Page()
    parsed.feed(page)
    assert parsed.balanced and not parsed.stack
    assert parsed.sections == tokens.shape[0]
    assert parsed.text_spans == [tokens.shape[1]] * tokens.shape[0]  # every position shown once per row
    assert parsed.bars == int(out.rounds.sum())  # one timeline bar per round
    assert set(parsed.classes) <= set(ORIGINS) | {"none"} and set(ORIGINS) <= set(parsed.classes)
    assert "<script" not in page and "http" not in page  # self-contained: nothing to fetch
    text = render_text(out.trace, out.tokens)
    assert text.count("round ") == int(out.rounds.sum()) and text.count("row ") == tokens.shape[0]


def _browser() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser installed")
def test_page_renders_in_a_headless_browser(traced, tmp_path):
    _, runs = traced
    _, out = runs["assd-self"]
    page = tmp_path / "trace.html"
    page.write_text(render_html(out.trace, out.tokens))
    dom = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    parsed = _Page()
    parsed.feed(dom)
    assert parsed.sections == out.tokens.shape[0] and parsed.bars == int(out.rounds.sum())


def test_sample_cli_writes_the_trace_and_shows_rounds_without_changing_samples(tiny_model_dir, tmp_path, capsys):
    argv = ["sample", "--model", str(tiny_model_dir), "--text", "The cat <mask:4> on the mat.", "--k", "2",
            "--sampler", "assd-fused", "--batch-size", "2", "--seed", "3", "--no-progress"]
    assert main(argv) == 0
    plain = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("[", "    "))]
    page = tmp_path / "decode.html"
    assert main(argv + ["--trace", str(page), "--show-rounds"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith(("[", "    "))] == plain
    assert "row 1:" in out and "round 1 (" in out and page.is_file()
    parsed = _Page()
    parsed.feed(page.read_text())
    assert parsed.balanced and parsed.sections == 2
    assert main(argv + ["--trace", str(tmp_path / "missing" / "decode.html")]) == 2  # before any decoding
    assert "does not exist" in capsys.readouterr().err


def test_sequential_trace_has_one_round_per_token(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=12)
    out = sequential_decode(model, tokens, sigma, n_prompt, lengths, seed=0, trace=True)
    assert [len(rows) for rows in out.trace.rows] == (lengths - n_prompt).tolist()
