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
    """Including the fixed price of a call with drafts beside a sequential step's (one query row, nothing else)."""
    truth = CallCost(host=0.004, per_query_row=0.0005, per_head_slot=0.001, per_content_row=0.0002, batch_rows=1,
                     length=8, device="cpu", threads=1, per_drafting_call=0.002)
    samples = [{"query_rows": q, "head_slots": h, "content_rows": c, "seconds": truth(q, h, c)}
               for q, h, c in [(1, 0, 0), (4, 1, 1), (7, 3, 3), (16, 3, 3), (16, 5, 2), (9, 2, 5)] for _ in range(3)]
    samples.append({"query_rows": 4, "head_slots": 1, "content_rows": 1, "seconds": 1.0})  # another process ran
    fitted = fit_call_cost(samples, 1, 8, "cpu", 0.1)
    for name in ("host", "per_query_row", "per_head_slot", "per_content_row", "per_drafting_call"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-9)
    assert fitted(1) == pytest.approx(0.0045) and fitted(2) == pytest.approx(0.0070)


def test_a_width_the_linear_fit_misses_is_priced_as_measured_and_chosen_by_it(tmp_path):
    """Calls verifying 2 drafts cost as much as calls verifying 3 (a matrix product's cliff in its rows): the
    fit's residual per drafts verified prices them as measured, in every shape that verifies 2 (a cover of 1
    too), after a save and load as well; the linear fit alone priced width 2 below width 3, and the controller
    then took width 2 where width 3 commits more tokens for the same time."""
    linear = CallCost(host=0.004, per_query_row=0.0001, per_head_slot=0.0004, per_content_row=0.0001, batch_rows=1,
                      length=8, device="cpu", threads=1, per_drafting_call=0.002)

    def truth(q, h, c):
        return linear(q, h, c) + (0.0008 if c == 2 else 0.0)

    kinds = [(1, 0, 0), (4, 1, 1), (9, 2, 2), (16, 3, 3), (25, 4, 4), (6, 5, 0)]
    samples = [{"query_rows": q, "head_slots": h, "content_rows": c, "seconds": truth(q, h, c)} for q, h, c in kinds]
    fitted = fit_call_cost(samples, 1, 8, "cpu", 0.1)
    for kind in kinds:
        assert fitted(*kind) == pytest.approx(truth(*kind), rel=1e-9)
    assert sorted(fitted.residuals) == [1, 2, 3, 4] and fitted(5, 2, 2) - fitted.linear(5, 2, 2) == \
        pytest.approx(fitted.residuals[2])
    fitted.save(tmp_path / "cost.json")
    assert CallCost.load(tmp_path / "cost.json")(9, 2, 2) == pytest.approx(truth(9, 2, 2))

    options = [(0, 1), (2, 3), (3, 4)]
    state = ControlState(n_fixed=torch.tensor([3]), stop=torch.tensor([60]), pending=torch.tensor([0]),
                         drafted_by_index=torch.tensor([[40, 40, 40]]), accepted_by_index=torch.tensor([[26, 26, 26]]),
                         all_proposals=torch.zeros(1, 3, 5), sel=slice(None))

    def width(cost):
        return int(GoodputController(cost, 3, options, True, True, prior=0.65, margin=0.0).plan(state).width[0])

    assert width(fitted) == 3 and width(dataclasses.replace(fitted, residuals={})) == 2


def test_cost_profile_is_reused_only_where_it_was_measured(tmp_path):
    cost = CallCost(host=0.01, per_query_row=0.001, per_head_slot=0.0, per_content_row=0.0, batch_rows=2, length=8,
                    device="cpu", threads=torch.get_num_threads())
    cost.save(tmp_path / "cost.json")
    loaded = CallCost.load(tmp_path / "cost.json")
    assert loaded == cost and loaded.matches("cpu", 2, 8)
    assert not loaded.matches("cpu", 3, 8) and not loaded.matches("cuda:0", 2, 8)
    assert not loaded.matches("cpu", 2, 8, "float16")  # measured without a draft head, or with one in another dtype
    in_half = dataclasses.replace(cost, proposal_dtype="float16")
    in_half.save(tmp_path / "half.json")
    assert CallCost.load(tmp_path / "half.json").matches("cpu", 2, 8, "float16")
    assert not CallCost.load(tmp_path / "half.json").matches("cpu", 2, 8, "float32")
    assert not loaded.matches("cpu", 2, 8, max_new_tokens=4)  # priced whole texts, not 4 new tokens
    short = dataclasses.replace(cost, max_new_tokens=4)
    short.save(tmp_path / "short.json")
    assert CallCost.load(tmp_path / "short.json").matches("cpu", 2, 8, max_new_tokens=4)
    assert not CallCost.load(tmp_path / "short.json").matches("cpu", 2, 8)
    data = json.loads((tmp_path / "cost.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps(data | {"threads": torch.get_num_threads() + 1}))
    assert not CallCost.load(tmp_path / "other.json").matches("cpu", 2, 8)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be read"):
        CallCost.load(tmp_path / "bad.json")


def test_auto_is_sequential_decoding_where_drafts_cannot_pay(tmp_path, monkeypatch):
    """A query row that costs far more than a call: no schedule with drafts could beat sequential steps even with
    every draft accepted, so no row ever drafts (no first drafts, no probes): one query row and one token a call,
    and the controller is not even asked for a plan (a sequential step's cost)."""
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0), _batch()
    path = _cost(tmp_path / "cost.json", tokens, host=0.001, per_query_row=1.0)
    monkeypatch.setattr(GoodputController, "plan", lambda *args: pytest.fail("asked for a plan"))
    out = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=4, cost_profile=path, seed=0)
    assert all(call["query_rows"] == 1 and set(call["drafts"]) == {0} for call in out.schedule)
    assert bool((out.nfe == tokens.shape[1] - 2).all())


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

    def plan(accepted):  # each state in a controller of its own (a controller keeps its choice between verdicts)
        controller = GoodputController(cost, 3, options, accepted_first=False, head=False, prior=0.3)
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
    """A predicted gain smaller than the margin is taken as no gain (sequential steps); a larger one drafts (on
    the rates themselves, without optimism: tests below). The default margin is the fit's largest relative
    error over the profiled calls, capped."""
    from asarm.sampling.controller import MAX_MARGIN

    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1)
    options = [(0, 1)] + [(w, c) for w in (1, 2, 3) for c in (1, 2, w + 1)]
    state = ControlState(n_fixed=torch.tensor([3]), stop=torch.tensor([8]), pending=torch.tensor([1]),
                         drafted_by_index=torch.tensor([[40, 30, 20]]), accepted_by_index=torch.tensor([[30, 20, 12]]),
                         all_proposals=torch.zeros(1, 3, 5), sel=slice(None))
    free = GoodputController(cost, 3, options, accepted_first=False, head=False, prior=0.3, optimism=0.0)
    rates = expected_rates(free.acceptance(state), free.widths, free.covers, free.seconds_with,
                           free.seconds_without, False)
    gain = float(rates.max() / rates[0]) - 1
    assert free.margin == 0 and gain > 0.05 and int(free.plan(state).width[0]) > 0

    def width(margin):
        controller = GoodputController(cost, 3, options, accepted_first=False, head=False, prior=0.3, margin=margin,
                                       optimism=0.0)
        return int(controller.plan(state).width[0])

    assert width(gain - 0.01) > 0 and width(gain + 0.01) == 0
    # the default margin: a profile whose calls the fit misses by up to 40% (capped at MAX_MARGIN), exact ones 0
    exact = [{"query_rows": q, "head_slots": 0, "content_rows": 0, "seconds": cost(q)} for q in (1, 4, 9)]
    assert dataclasses.replace(cost, samples=exact).relative_error == pytest.approx(0.0, abs=1e-12)
    off = exact + [{"query_rows": 6, "head_slots": 0, "content_rows": 0, "seconds": cost(6) / 1.4}]
    assert dataclasses.replace(cost, samples=off).relative_error == pytest.approx(0.4)
    noisy = GoodputController(dataclasses.replace(cost, samples=off), 3, options, False, False, 0.3)
    assert noisy.margin == MAX_MARGIN


def test_relative_error_counts_the_noise_between_blocks():
    """Two blocks of one kind of call 20% apart: their median sits on the fit, but a price may be off by the
    spread of the blocks (10% of the mean), which the margin must cover; without block labels only misfit counts."""
    cost = CallCost(host=0.01, per_query_row=0.001, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1)
    samples = [{"query_rows": q, "head_slots": 0, "content_rows": 0, "block": block, "seconds": cost(q) * factor}
               for q in (1, 4) for block, factor in ((0, 0.9), (1, 1.1))]
    assert dataclasses.replace(cost, samples=samples).relative_error == pytest.approx(0.1 / 0.9)
    unlabelled = [{key: value for key, value in sample.items() if key != "block"} for sample in samples]
    assert dataclasses.replace(cost, samples=unlabelled).relative_error == pytest.approx(0.0, abs=1e-12)


def test_profile_encodes_the_prompt_once_halfway_through_the_decoded_span(monkeypatch):
    """Every block of the profile runs on one engine session (the prompt is encoded once, not once a block), and
    its prompt ends halfway through the span the decode will fill (max_new_tokens), not halfway through the text."""
    from asarm.sampling import assd

    sessions = []
    make_engine = assd.make_engine

    class Recording:
        def __init__(self, engine):
            self.engine = engine

        def start(self, tokens, sigma, n_prompt):
            sessions.append((n_prompt.clone(), self.engine.start(tokens, sigma, n_prompt)))
            return sessions[-1][1]

    monkeypatch.setattr(assd, "make_engine", lambda engine, model: Recording(make_engine(engine, model)))
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0), _batch(batch_size=2, seq_len=24)
    spec = SAMPLERS["assd-auto"].replace(k=2).resolve(model)
    cost = assd.profile_calls(model, (tokens, sigma, n_prompt, None, None, 8), spec, budget_seconds=60.0)
    assert len(sessions) == 1 and cost.max_new_tokens == 8
    prompt, session = sessions[0]
    assert prompt.tolist() == [2 + 8 // 2] * 2
    assert len({sample["block"] for sample in cost.samples}) == 2 * len(assd._profiled_schedules(2))
    # the prompt once (6 ranks a row), then only what the calls commit and draft: far less than once a block
    assert session.stats["content_rows"] < 2 * int(prompt.sum()) + 4 * len(cost.samples)


def test_a_decode_of_another_max_new_tokens_is_profiled_again(tmp_path, monkeypatch):
    from asarm.sampling import assd, cost

    monkeypatch.setattr(cost, "_PROFILES", {})  # the process's profiles so far (keyed by a model's id)
    profiled = []
    profile_calls = assd.profile_calls
    monkeypatch.setattr(assd, "profile_calls", lambda *args, **kw: profiled.append(args[1][5]) or
                        profile_calls(*args, **kw))
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0), _batch(batch_size=1, seq_len=16)
    for max_new_tokens in (4, 4, None, 4):
        assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=2, seed=0,
                    max_new_tokens=max_new_tokens)
    assert profiled == [4, None]


def test_profile_command_prints_the_fit_and_writes_it(tiny_model_dir, tmp_path, capsys):
    from asarm.cli import main

    out = tmp_path / "cost.json"
    assert main(["profile", "--model", str(tiny_model_dir), "--k", "2", "--length", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted ms" in printed and "ms a call with drafts" in printed and "largest relative error" in printed
    cost = CallCost.load(out)
    assert cost.matches("cpu", 1, 16) and len(cost.samples) >= 4 and cost.host >= 0
    assert main(["profile", "--model", str(tiny_model_dir), "--k", "2", "--length", "16", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    assert "4 new tokens" in capsys.readouterr().out and CallCost.load(out).matches("cpu", 1, 16, max_new_tokens=4)


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


def _state(drafted, accepted, pending=1):
    b = len(drafted)
    return ControlState(n_fixed=torch.full((b,), 3), stop=torch.full((b,), 100), pending=torch.full((b,), pending),
                        drafted_by_index=torch.tensor(drafted), accepted_by_index=torch.tensor(accepted),
                        all_proposals=torch.zeros(b, 3, 5), sel=slice(None))


OPTIONS = [(0, 1)] + [(w, c) for w in (1, 2, 3) for c in (1, 2, w + 1)]


def test_a_few_early_rejections_do_not_stop_a_row_from_drafting():
    """The same rate over few verdicts drafts (its standard error leaves room for a gain), over many it does not;
    without optimism both are sequential."""
    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1, per_drafting_call=0.6)
    controller = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.05,
                                   prior_weight=4.0)
    few, many = _state([[4, 2, 1]], [[3, 1, 1]]), _state([[400, 200, 100]], [[300, 100, 100]])  # 5 in 7
    assert int(controller.plan(few).width[0]) > 0
    assert int(controller.plan(many).width[0]) == 0
    cautious = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.05,
                                 prior_weight=4.0, optimism=0.0)
    assert int(cautious.plan(few).width[0]) == 0


def test_idle_rows_probe_with_the_drafting_option_within_the_budget():
    """A row on sequential steps drafts once every probe interval, with the option it would draft with, and the
    interval keeps a probe's extra price within PROBE_BUDGET of the sequential steps between probes."""
    from asarm.sampling.controller import PROBE_BUDGET

    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1, per_drafting_call=0.6)
    controller = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.1)
    poor, rows = _state([[400, 200, 100]], [[40, 0, 0]], pending=0), torch.tensor([0])
    widths = [int(controller.plan(poor, rows).width[0]) for _ in range(200)]
    probes = [i for i, width in enumerate(widths) if width > 0]
    every = probes[1] - probes[0]
    assert len(probes) > 3 and all(b - a == every for a, b in zip(probes, probes[1:]))
    probe = controller._drafting_best(controller._rates(controller.acceptance(poor)))
    assert {widths[i] for i in probes} == {int(controller.widths[probe])}
    extra = float(controller.seconds_with[probe] - controller.seconds_with[0])
    assert extra / every <= PROBE_BUDGET * float(controller.seconds_with[0]) < extra / (every - 1)


def test_the_profile_prices_a_call_by_the_head_slots_it_ran(monkeypatch):
    """Covering only the all-accepted outcome, a call whose drafts were rejected runs no head chain (the next
    call has nothing to verify): the profile records it with no head slots, so the fit does not charge it."""
    from asarm.sampling import assd
    from asarm.sampling.drafters import HeadDrafter

    from helpers import random_head

    monkeypatch.setattr(assd, "PROFILE_CALLS", 4)
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0), _batch(batch_size=1, seq_len=24)
    spec = SAMPLERS["assd-auto"].replace(k=3, drafter=HeadDrafter(random_head(model, seed=1, std=1.0))).resolve(model)
    cost = assd.profile_calls(model, (tokens, sigma, n_prompt, None, None, None), spec, budget_seconds=60.0)
    calls = [s for s in cost.samples if (s["width"], s["cover"]) == (3, 1)]
    assert len(calls) == 8  # two blocks of consecutive calls
    pairs = [(call, after) for block in (calls[:4], calls[4:]) for call, after in zip(block, block[1:])]
    for call, after in pairs:
        assert call["head_slots"] == (3 if after["content_rows"] else 0)
    assert {call["head_slots"] for call, _ in pairs} == {0, 3}  # both happened


def test_no_row_drafts_where_drafts_could_not_pay_even_at_the_ceiling_rate():
    """Calls whose price grows with their rows so fast that no option beats sequential steps at
    CEILING_ACCEPTANCE per slot: a row without verdicts does not try a first draft, an idle row never probes."""
    from asarm.sampling.controller import CEILING_ACCEPTANCE

    cost = CallCost(host=1.0, per_query_row=0.35, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1)
    controller = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.1)
    ones = torch.ones(1, 3, dtype=torch.float64)
    assert controller._gain(controller._rates(ones)) > 0.1  # with every draft accepted drafting would pay
    assert controller._gain(controller._rates(ones * CEILING_ACCEPTANCE)) <= 0.1
    fresh, rows = _state([[0, 0, 0]], [[0, 0, 0]], pending=0), torch.tensor([0])
    assert not controller.drafting_can_pay
    assert all(int(controller.plan(fresh, rows).width[0]) == 0 for _ in range(100))


def test_a_call_in_which_every_row_drafts_restarts_their_idle_count():
    """Rows that drafted (the batch chose drafts) count their calls without drafts from zero again: their next
    probe comes a whole interval later; every row of such a call gets the batch's option."""
    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=2, length=8,
                    device="cpu", threads=1, per_drafting_call=0.6)

    def controller():
        return GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.1)

    poor = _state([[400, 200, 100]] * 2, [[40, 0, 0]] * 2, pending=0)
    good = _state([[500, 300, 200]] * 2, [[490, 295, 196]] * 2)
    rows = torch.tensor([0, 1])
    alone = controller()
    every = 1 + next(i for i in range(500) if int(alone.plan(poor, rows).width.max()) > 0)
    assert every > 2
    control = controller()
    assert all(int(control.plan(poor, rows).width.max()) == 0 for _ in range(every - 2))
    drafting = control.plan(good, rows)
    assert drafting.width.tolist() == [int(control.widths[control._best])] * 2 and control._best != 0
    widths = [int(control.plan(poor, rows).width.max()) for _ in range(every)]
    assert widths == [0] * (every - 1) + [widths[-1]] and widths[-1] > 0


def test_the_choice_is_kept_between_verdicts_and_renewed_by_them():
    """Young rates: a new choice at every new verdict; settled ones: every REPLAN_VERDICTS verdicts."""
    from asarm.sampling.controller import REPLAN_VERDICTS, SETTLED_VERDICTS

    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1)
    controller = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.05)
    choices = []
    original = controller._choose
    controller._choose = lambda state: choices.append(int(state.drafted_by_index.sum())) or original(state)
    for drafted in [0, 0, 1, 2, 2] + list(range(SETTLED_VERDICTS, SETTLED_VERDICTS + 2 * REPLAN_VERDICTS + 1)):
        controller.plan(_state([[drafted, 0, 0]], [[drafted // 2, 0, 0]]))
    assert choices == [0, 1, 2, SETTLED_VERDICTS, SETTLED_VERDICTS + REPLAN_VERDICTS,
                       SETTLED_VERDICTS + 2 * REPLAN_VERDICTS]


def test_measured_call_times_correct_the_profiled_prices():
    """A profile taken in a slow spell prices sequential steps at twice their cost: after a few measured steps
    the controller prices them as measured, and drafting that looked worthwhile is no longer chosen."""
    from asarm.sampling.controller import MIN_OBSERVED

    cost = CallCost(host=2.0, per_query_row=0.0, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1, per_drafting_call=0.5)
    controller = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.05,
                                   optimism=0.0)
    state = _state([[400, 300, 200]], [[300, 200, 100]])
    assert int(controller.plan(state).width[0]) > 0
    for _ in range(MIN_OBSERVED):
        controller.observe({"query_rows": 1, "head_slots": 0, "content_rows": 0}, 1.0)
    assert controller.scales == [0.5, 1.0] and controller.price({"query_rows": 1}) == pytest.approx(1.0)
    assert int(controller.plan(state).width[0]) == 0
    for _ in range(MIN_OBSERVED):  # calls with drafts measured as cheap as sequential steps: drafting pays again
        controller.observe({"query_rows": 4, "head_slots": 0, "content_rows": 1}, 1.0)
    assert int(controller.plan(state).width[0]) > 0


def test_a_decode_records_its_call_times_and_learns_prices_only_when_asked(monkeypatch, tmp_path):
    """assd-auto: every call in its schedule carries its measured seconds, which its controller sees; it learns
    prices from them with learn_prices, and otherwise keeps the profile's (the same prices, the same draws)."""
    from asarm.sampling import assd

    controllers, seen = [], []
    build = assd.auto_controller
    monkeypatch.setattr(assd, "auto_controller", lambda *args: controllers.append(build(*args)) or controllers[-1])
    observe = assd.GoodputController.observe
    monkeypatch.setattr(assd.GoodputController, "observe",
                        lambda self, call, seconds: seen.append(seconds) or observe(self, call, seconds))
    model, (tokens, sigma, n_prompt) = tiny_model(seed=0), _batch(batch_size=2)
    path = _cost(tmp_path / "cost.json", tokens, host=0.01)
    out = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=3, seed=0, cost_profile=path,
                      learn_prices=True)
    assert all(call["seconds"] > 0 for call in out.schedule) and seen == [call["seconds"] for call in out.schedule]
    assert controllers[-1].learn_prices and out.settings["learn_prices"]
    assert controllers[-1].scales != [1.0, 1.0]  # a call takes far less than the 10 ms the profile says
    fixed = [assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-auto"], k=3, seed=0, cost_profile=path)
             for _ in range(2)]
    assert all(call["seconds"] > 0 for call in fixed[0].schedule)
    assert not controllers[-1].learn_prices and controllers[-1].scales == [1.0, 1.0]
    assert torch.equal(fixed[0].tokens, fixed[1].tokens)  # the same prices: the same draws
    assert "corrections" not in json.loads((tmp_path / "cost.json").read_text())


def test_learned_corrections_carry_over_to_the_next_decode_of_the_process():
    """The corrections live with the profile: a second controller on it starts from the first one's."""
    from asarm.sampling.controller import MIN_OBSERVED

    cost = CallCost(host=2.0, per_query_row=0.0, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1, per_drafting_call=0.5)
    first = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3)
    for _ in range(MIN_OBSERVED):
        first.observe({"query_rows": 1}, 1.0)
    second = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3)
    assert second.scales == [0.5, 1.0] and float(second.seconds_with[0]) == pytest.approx(1.0)
    fixed = GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, learn_prices=False)
    fixed.observe({"query_rows": 1}, 1.0)
    assert fixed.scales == [1.0, 1.0] and float(fixed.seconds_with[0]) == pytest.approx(2.0)


def test_drafting_starts_above_the_margin_and_goes_on_while_it_gains():
    """A gain between 0 and the margin: sequential steps do not start drafting, drafting does not stop; a loss
    stops it (switching costs a call that only prepares drafts, so a choice near the line must not flap)."""
    cost = CallCost(host=1.0, per_query_row=0.08, per_head_slot=0.0, per_content_row=0.0, batch_rows=1, length=8,
                    device="cpu", threads=1, per_drafting_call=0.2)

    def controller():
        return GoodputController(cost, 3, OPTIONS, accepted_first=False, head=False, prior=0.3, margin=0.2,
                                 optimism=0.0, learn_prices=False)

    near = _state([[400, 300, 200]], [[240, 180, 120]])  # 60% per slot
    gain = controller()._gain(controller()._rates(controller().acceptance(near)))
    assert 0 < gain < 0.2
    assert int(controller().plan(near).width[0]) == 0
    drafting = controller()
    assert int(drafting.plan(_state([[392, 300, 200]], [[392, 300, 200]])).width[0]) > 0
    assert int(drafting.plan(near).width[0]) > 0  # 8 new verdicts: a new choice, which keeps drafting
    assert int(drafting.plan(_state([[408, 300, 200]], [[100, 0, 0]])).width[0]) == 0
