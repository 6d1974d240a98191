"""Decode traces: they never change the samples, they account for every token and call, and they render
to a well-formed self-contained page (checked in a headless browser where one is installed)."""

import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import pytest
import torch

from asarm.cli import main
from asarm.sampling import assd_decode, sequential_decode
from asarm.sampling.trace import _REJECTED, ORIGINS, DecodeTrace, Round, render_html, render_text

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
        assert all(r.accepted <= len(r.drafts) <= r.drafted <= 3 for r in rounds)
        if name == "sequential":
            assert set(origins) == {"sequential"} and all(not r.drafts for r in rounds)
        else:
            # a residual is drawn exactly where a verified draft was rejected
            assert origins.count("residual") == sum(r.accepted < len(r.drafts) for r in rounds)
            assert sum(len(r.drafts) for r in rounds) == int(out.drafted_by_index[b].sum())
            assert all(0 < q <= 1 and 0 <= p <= 1 for r in rounds for _, _, q, p in r.drafts)
            # a draft is rejected only where the target gives it less than the proposal did (p < q)
            assert all(r.rejected[3] < r.rejected[2] for r in rounds if r.rejected is not None)
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
    page = render_html(out.trace, out.tokens, tokenizer=None, sampler=out.sampler)
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
    page.write_text(render_html(out.trace, out.tokens, sampler=out.sampler))
    dom = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    parsed = _Page()
    parsed.feed(dom)
    assert parsed.sections == out.tokens.shape[0] and parsed.bars == int(out.rounds.sum())


class _Reading(HTMLParser):
    """What a reader of the page sees: its title, the settings table, and per row the struck-through drafts
    (token, q and p), the chart's bars (height of each part) and the chart's axis labels."""

    def __init__(self):
        super().__init__()
        self.title, self.settings, self.struck, self.bars, self.axis = "", {}, [], [], []
        self.open, self.key = [], None

    def inside(self, tag: str, css: str | None = None) -> bool:
        return any(t == tag and (css is None or css in classes) for t, classes in self.open)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag not in _Page.VOID:
            self.open.append((tag, classes))
        if tag == "section":
            self.struck.append([])
            self.bars.append([])
            self.axis.append([])
        elif tag == "del" and self.inside("section"):
            self.struck[-1].append(["", ""])
        elif tag == "g" and "bar" in classes:
            self.bars[-1].append({})
        elif tag == "rect" and self.inside("g", "bar"):
            self.bars[-1][-1][classes[0]] = float(attrs["height"])

    def handle_endtag(self, tag):
        self.open.pop()

    def handle_data(self, data):
        if self.inside("title") and not self.inside("svg"):
            self.title += data
        elif self.inside("th"):
            self.key = data
        elif self.inside("td"):
            self.settings[self.key] = data
        elif self.inside("del") and self.inside("section"):
            self.struck[-1][-1][self.inside("span", "qp")] += data
        elif self.inside("text") and not self.inside("g", "bar"):
            self.axis[-1].append(data)


def _qp(note: str) -> tuple[float, float]:
    """``q=0.31, p=0.02`` -> (0.31, 0.02)."""
    q, p = (part.split("=")[1] for part in note.split(", "))
    return float(q), float(p)


def test_page_names_the_sampler_lists_its_settings_and_strikes_out_every_rejected_draft(traced):
    _, runs = traced
    _, out = runs["assd-fused"]
    settings = {"seed": 200, "k": 3, "temperature": 1.0, "outcomes": None, "bonus": True}
    page = _Reading()
    page.feed(render_html(out.trace, out.tokens, sampler=out.sampler, settings=settings))
    assert out.sampler in page.title
    assert page.settings == {"sampler": "assd-fused", "seed": "200", "k": "3", "temperature": "1", "outcomes": "-",
                             "bonus": "True"}  # None: does not apply to this sampler
    rejected = [[r.rejected for r in rounds if r.rejected is not None] for rounds in out.trace.rows]
    assert sum(map(len, rejected)) >= 3  # the page has rejections to show
    tokens = [[f"[{token}]" for _, token, _, _ in row] for row in rejected]
    assert [[token for token, _ in row] for row in page.struck] == tokens
    for shown, recorded in zip(page.struck, rejected):
        for (_, note), (_, _, q, p) in zip(shown, recorded):
            assert _qp(note) == pytest.approx((q, p), rel=0.06)  # two significant digits
    for bars, axis, rounds in zip(page.bars, page.axis, out.trace.rows):
        assert len(bars) == len(rounds)
        top = max(r.drafted for r in rounds)
        assert axis[:top + 1] == [str(n) for n in range(top + 1)] and "round" in axis and "drafts" in axis
        unit = {bar["drafted"] / r.drafted for bar, r in zip(bars, rounds) if r.drafted}
        assert len(unit) <= 1  # one scale for the whole chart
        for bar, r in zip(bars, rounds):
            assert bar.get("accepted", 0.0) == pytest.approx(r.accepted * min(unit, default=0), abs=0.1)
            assert bar.get("rejected", 0.0) == pytest.approx((len(r.drafts) - r.accepted) * min(unit, default=0),
                                                             abs=0.1)


def _round(drafts: list[tuple[int, int, float, float]], accepted: int, drafted: int) -> Round:
    committed = [(position, token, "draft") for position, token, _, _ in drafts[:accepted]]
    return Round(calls=1, queried=[0], drafts=drafts, accepted=accepted, drafted=drafted,
                 committed=committed + [(9, 1, "residual" if accepted < len(drafts) else "bonus")])


def test_chart_draws_one_of_two_accepted_unlike_one_of_one():
    rounds = [_round([(1, 3, 0.5, 0.6), (2, 4, 0.5, 0.1)], accepted=1, drafted=2),
              _round([(1, 3, 0.5, 0.6)], accepted=1, drafted=1),
              _round([(1, 3, 0.5, 0.6), (2, 4, 0.5, 0.1)], accepted=1, drafted=4)]
    page = _Reading()
    page.feed(render_html(DecodeTrace(rows=[rounds], prompt=[[0]]), torch.zeros(1, 10, dtype=torch.long),
                          sampler="assd-self"))
    (one_of_two, one_of_one, one_of_four), = page.bars
    unit = one_of_one["drafted"]
    assert one_of_two == pytest.approx({"drafted": 2 * unit, "accepted": unit, "rejected": unit}, abs=0.1)
    assert one_of_one == pytest.approx({"drafted": unit, "accepted": unit}, abs=0.1)
    assert one_of_four == pytest.approx({"drafted": 4 * unit, "accepted": unit, "rejected": unit}, abs=0.1)
    assert page.axis[0][:5] == ["0", "1", "2", "3", "4"]
    assert page.struck == [[["[4]", "q=0.5, p=0.1"], ["[4]", "q=0.5, p=0.1"]]]


def _screenshot(page, tmp_path, name: str):
    """The page as a headless browser draws it in a 1200 x 900 window: a PIL image."""
    image = pytest.importorskip("PIL.Image")
    html_file, shot = tmp_path / f"{name}.html", tmp_path / f"{name}.png"
    html_file.write_text(page, encoding="utf-8")
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,900", html_file.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return image.open(shot)


@pytest.mark.skipif(_browser() is None, reason="no headless browser installed")
def test_screenshot_shows_the_rejected_drafts(traced, tmp_path):
    _, runs = traced
    _, out = runs["assd-fused"]
    rejecting = [b for b, rounds in enumerate(out.trace.rows) if any(r.rejected for r in rounds)]
    clean = [b for b, rounds in enumerate(out.trace.rows) if not any(r.rejected for r in rounds)]
    colour = tuple(int(_REJECTED[i:i + 2], 16) for i in (1, 3, 5))
    seen = {}
    for name, b in (("rejecting", rejecting[0]), ("clean", clean[0])):
        one_row = DecodeTrace(rows=[out.trace.rows[b]], prompt=[out.trace.prompt[b]])
        with _screenshot(render_html(one_row, out.tokens[b:b + 1], sampler=out.sampler), tmp_path, name) as shot:
            assert shot.format == "PNG" and shot.size == (1200, 900)
            pixels = Counter({rgb: count for count, rgb in shot.convert("RGB").getcolors(1200 * 900)})
        assert len(pixels) > 50 and pixels.most_common(1)[0][1] < 0.98 * 1200 * 900  # not blank
        seen[name] = pixels[colour]
    # the page legend shows the colour once; a row with a rejection adds its struck draft and its bar segment
    assert seen["clean"] > 0 and seen["rejecting"] > seen["clean"] + 1000


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
    parsed, reading = _Page(), _Reading()
    parsed.feed(page.read_text())
    reading.feed(page.read_text())
    assert parsed.balanced and parsed.sections == 2
    assert reading.title.endswith(": assd-fused")  # the resolved spec's settings, with the seed
    assert {name: reading.settings[name] for name in ("seed", "k", "temperature", "drafter", "outcomes")} == \
        {"seed": "3", "k": "2", "temperature": "1", "drafter": "self", "outcomes": "2"}
    # the name the decode reports, derived from the settings: --sampler assd with n-gram drafts is assd-ngram
    ngram = argv[:7] + ["--sampler", "assd", "--drafter", "ngram", "--seed", "3", "--trace", str(page), "--no-progress"]
    assert main(ngram) == 0
    reading = _Reading()
    reading.feed(page.read_text())
    assert reading.title.endswith(": assd-ngram") and reading.settings["sampler"] == "assd-ngram"
    assert main(argv + ["--trace", str(tmp_path / "missing" / "decode.html")]) == 2  # before any decoding
    assert "does not exist" in capsys.readouterr().err


def test_sequential_trace_has_one_round_per_token(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=12)
    out = sequential_decode(model, tokens, sigma, n_prompt, lengths, seed=0, trace=True)
    assert [len(rows) for rows in out.trace.rows] == (lengths - n_prompt).tolist()
