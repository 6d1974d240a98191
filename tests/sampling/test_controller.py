"""The goodput controller of assd-auto and its call-cost model (exactness: tests/sampling/test_exactness.py)."""

import dataclasses
import json

import pytest
import torch

from asarm import orders
from asarm.sampling import SAMPLERS, assd_decode
from asarm.sampling.controller import ControlState, GoodputController, expected_rates, steady_state
from asarm.sampling.cost import CallCost, fit_call_cost

from helpers import tiny_model


def _batch(batch_size=4, seq_len=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_prompt = torch.full((batch_size,), 2)
    sigma = orders.any_subset(n_prompt, seq_len, batch_size=batch_size, generator=gen)
    return torch.randint(7, 10, (batch_size, seq_len), generator=gen), sigma, n_prompt


def _cost(path, tokens, **coefficients):
    values = {"host": 0.0, "per_query_row": 0.0, "per_head_slot": 0.0, "per_content_row": 0.0} | coefficients
    CallCost(**values, batch_rows=tokens.shape[0], length=tokens.shape[1], device="cpu",
             threads=torch.get_num_threads()).save(path)
    return str(path)


def test_expected_rates_closed_form():
    """Drafts always accepted, every outcome covered: a call commits w + 1 tokens; drafts never accepted and
    one outcome covered (accepted-first): half the calls have no drafts, each call commits one token."""
    widths, covers = torch.tensor([0, 2, 2]), torch.tensor([1, 3, 1])
    with_drafts, without = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 1.5, 1.5])
    always = expected_rates(torch.ones(1, 3, dtype=torch.float64), widths, covers, with_drafts, without, True)
    assert always.tolist() == pytest.approx([1.0, 3 / 2.0, 3 / 2.0])
    never = expected_rates(torch.zeros(1, 3, dtype=torch.float64), widths, covers, with_drafts, without, True)
    assert never.tolist() == pytest.approx([1.0, 1 / 2.0, 2 / (2.0 + 1.5)])
    # two such rows in one call: the call without drafts happens only when neither row has drafts (1/4)
    pair = expected_rates(torch.zeros(2, 3, dtype=torch.float64), widths, covers, with_drafts, without, True)
    assert pair[2] == pytest.approx(2 * 1.0 / (0.25 * 1.5 + 0.75 * 2.0))


def test_cost_fit_recovers_a_linear_model_and_ignores_a_slow_call():
    truth = CallCost(host=0.004, per_query_row=0.0005, per_head_slot=0.001, per_content_row=0.0002, batch_rows=1,
                     length=8, device="cpu", threads=1)
    samples = [{"query_rows": q, "head_slots": h, "content_rows": c, "seconds": truth(q, h, c)}
               for q, h, c in [(1, 0, 0), (4, 1, 1), (7, 3, 3), (16, 3, 3), (16, 5, 2), (9, 2, 5)] for _ in range(3)]
    samples.append({"query_rows": 4, "head_slots": 1, "content_rows": 1, "seconds": 1.0})  # another process ran
    fitted = fit_call_cost(samples, 1, 8, "cpu", 0.1)
    for name in ("host", "per_query_row", "per_head_slot", "per_content_row"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-9)


def test_cost_profile_is_reused_only_where_it_was_measured(tmp_path):
    cost = CallCost(host=0.01, per_query_row=0.001, per_head_slot=0.0, per_content_row=0.0, batch_rows=2, length=8,
                    device="cpu", threads=torch.get_num_threads())
    cost.save(tmp_path / "cost.json")
    loaded = CallCost.load(tmp_path / "cost.json")
    assert loaded == cost and loaded.matches("cpu", 2, 8)
    assert not loaded.matches("cpu", 3, 8) and not loaded.matches("cuda:0", 2, 8)
    data = json.loads((tmp_path / "cost.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps(data | {"threads": torch.get_num_threads() + 1}))
    assert not CallCost.load(tmp_path / "other.json").matches("cpu", 2, 8)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be read"):
        CallCost.load(tmp_path / "bad.json")


def test_auto_falls_back_to_sequential_where_drafts_do_not_pay(tmp_path):
    """A query row that costs far more than a call: after the first call, whose rows try one draft each to get a
    first verdict, every call is a sequential step (no drafts, no outcome rows: one query row, one token)."""
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0), _batch()
    path = _cost(tmp_path / "cost.json", tokens, host=0.001, per_query_row=1.0)
    out = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=4, cost_profile=path, seed=0)
    assert out.schedule[0]["drafts"] == [1, 1, 1, 1]
    assert all(call["query_rows"] == 1 and set(call["drafts"]) == {0} for call in out.schedule[2:])
    assert bool((out.nfe >= tokens.shape[1] - 2 - 1).all())  # at most one token gained by the first draft


def test_auto_drafts_where_calls_are_fixed_cost(tmp_path):
    """Calls whose cost does not grow with their rows: the widest schedule pays, and each row verifies drafts."""
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0, init_std=0.02), _batch()  # near-uniform: drafts pass
    path = _cost(tmp_path / "cost.json", tokens, host=0.01)
    out = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=3, cost_profile=path, seed=0)
    assert out.tokens_per_call.min() > 1.5 and max(max(call["drafts"]) for call in out.schedule) == 3


def test_the_batch_follows_its_rows_acceptance():
    """Rows whose drafts pass make drafting pay for their call; rows whose drafts fail make it sequential."""
    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=2, length=8,
                    device="cpu", threads=1)
    options = [(0, 1)] + [(w, c) for w in (1, 2, 3) for c in (1, 2, w + 1)]
    controller = GoodputController(cost, 3, options, accepted_first=False, head=False, prior=0.3)

    def plan(accepted):
        return controller.plan(ControlState(
            n_fixed=torch.tensor([3, 3]), stop=torch.tensor([8, 8]), pending=torch.tensor([1, 1]),
            drafted_by_index=torch.tensor([[40, 30, 20], [40, 30, 20]]), accepted_by_index=torch.tensor(accepted),
            all_proposals=torch.zeros(2, 3, 5), sel=slice(None)))

    good, bad = plan([[40, 30, 20], [38, 28, 18]]), plan([[0, 0, 0], [1, 0, 0]])
    assert int(good.width.min()) >= 2 and int(bad.width.max()) == 0
    tokens, without = steady_state(torch.tensor([[0.9, 0.9, 0.9], [0.1, 0.1, 0.1]], dtype=torch.float64),
                                   controller.widths, controller.covers, False)
    assert bool((tokens[0, 1:] > tokens[1, 1:]).all()) and float(tokens[:, 0].max()) == 1.0


def test_drafting_must_beat_sequential_steps_by_the_cost_models_error():
    """A predicted gain smaller than the margin is taken as no gain (sequential steps); a larger one drafts. The
    default margin is the fit's largest relative error over the profiled calls, capped."""
    from asarm.sampling.controller import MAX_MARGIN

    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1)
    options = [(0, 1)] + [(w, c) for w in (1, 2, 3) for c in (1, 2, w + 1)]
    state = ControlState(n_fixed=torch.tensor([3]), stop=torch.tensor([8]), pending=torch.tensor([1]),
                         drafted_by_index=torch.tensor([[40, 30, 20]]), accepted_by_index=torch.tensor([[30, 20, 12]]),
                         all_proposals=torch.zeros(1, 3, 5), sel=slice(None))
    free = GoodputController(cost, 3, options, accepted_first=False, head=False, prior=0.3)
    rates = expected_rates(free.acceptance(state), free.widths, free.covers, free.seconds_with,
                           free.seconds_without, False)
    gain = float(rates.max() / rates[0]) - 1
    assert free.margin == 0 and gain > 0.05 and int(free.plan(state).width[0]) > 0

    def width(margin):
        controller = GoodputController(cost, 3, options, accepted_first=False, head=False, prior=0.3, margin=margin)
        return int(controller.plan(state).width[0])

    assert width(gain - 0.01) > 0 and width(gain + 0.01) == 0
    # the default margin: a profile whose calls the fit misses by up to 40% (capped at MAX_MARGIN), exact ones 0
    exact = [{"query_rows": q, "head_slots": 0, "content_rows": 0, "seconds": cost(q)} for q in (1, 4, 9)]
    assert dataclasses.replace(cost, samples=exact).relative_error == pytest.approx(0.0, abs=1e-12)
    off = exact + [{"query_rows": 6, "head_slots": 0, "content_rows": 0, "seconds": cost(6) / 1.4}]
    assert dataclasses.replace(cost, samples=off).relative_error == pytest.approx(0.4)
    noisy = GoodputController(dataclasses.replace(cost, samples=off), 3, options, False, False, 0.3)
    assert noisy.margin == MAX_MARGIN


def test_profile_command_prints_the_fit_and_writes_it(tiny_model_dir, tmp_path, capsys):
    from asarm.cli import main

    out = tmp_path / "cost.json"
    assert main(["profile", "--model", str(tiny_model_dir), "--k", "2", "--length", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted ms" in printed and "ms a call with drafts" in printed and "largest relative error" in printed
    cost = CallCost.load(out)
    assert cost.matches("cpu", 1, 16) and len(cost.samples) >= 4 and cost.host >= 0


def test_sequential_steps_take_the_short_path_with_the_same_tokens(tmp_path, monkeypatch):
    """A call without drafts in or out skips the outcome machinery: same uniform, same token, same counts."""
    from asarm.sampling import assd

    model, (tokens, sigma, n_prompt) = tiny_model(seed=0), _batch(seed=2)
    path = _cost(tmp_path / "cost.json", tokens, host=0.001, per_query_row=1.0)
    short = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=3, cost_profile=path,
                        seed=torch.arange(4), trace=True)
    monkeypatch.setattr(assd._Speculation, "_sequential_step", staticmethod(lambda W, width: False))
    general = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=3, cost_profile=path,
                          seed=torch.arange(4), trace=True)
    assert torch.equal(short.tokens, general.tokens) and torch.equal(short.nfe, general.nfe)
    assert torch.equal(short.bonus_tokens, general.bonus_tokens) and torch.equal(short.rounds, general.rounds)
    assert [[r.committed for r in row] for row in short.trace.rows] == \
        [[r.committed for r in row] for row in general.trace.rows]


def test_output_and_trace_record_the_choices(tmp_path):
    """The schedule holds each call's rows, query rows, chosen width and outcomes, and the drafts each row has
    for the next call; the trace shows the same: every round verifies exactly the drafts the row's previous call
    left it, and the rows of one batch differ where an outcome was not covered."""
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0, init_std=0.5), _batch(batch_size=3)
    path = _cost(tmp_path / "cost.json", tokens, host=0.01, per_query_row=0.0005)
    out = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=3, cost_profile=path,
                      seed=torch.arange(3), trace=True)
    assert len(out.schedule) == int(out.nfe.max()) and out.schedule[0]["rows"] == [0, 1, 2]
    assert all(max(call["drafts"]) <= call["width"] for call in out.schedule)
    left = [[call["drafts"][call["rows"].index(b)] for call in out.schedule if b in call["rows"]] for b in range(3)]
    for b, rounds in enumerate(out.trace.rows):
        assert [round_.drafted for round_ in rounds[1:]] == left[b][:len(rounds) - 1]
    assert any(len(set(call["drafts"])) > 1 for call in out.schedule)
