"""The sampler spec: registry names, defaults filled once, overrides, and the one path from settings to decode."""

import argparse

import pytest
import torch

from asarm import orders
from asarm.sampling import SAMPLERS, SamplerSpec, assd_decode, decode
from asarm.sampling.spec import (DEFAULT_ADAPTIVE_THRESHOLD, SettingError, add_sampler_arguments, parse_samplers,
                                 resolve_samplers, sampler_overrides)

from helpers import random_head, tiny_model


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=0, init_std=0.5)
    model.attach_draft_head(random_head(model, seed=1))
    return model


def _batch(batch_size=3, seq_len=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_prompt = torch.randint(1, 3, (batch_size,), generator=gen)
    sigma = orders.any_subset(n_prompt, seq_len, batch_size=batch_size, generator=gen)
    return torch.randint(7, 10, (batch_size, seq_len), generator=gen), sigma, n_prompt


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_reports_its_registry_name(model, name):
    out = decode(model, SAMPLERS[name].replace(k=2), *_batch(), seed=0)
    assert out.sampler == name == SAMPLERS[name].name
    assert out.exact and int((out.tokens == model.mask_token_id).sum()) == 0


def test_bonus_sampler_is_named_as_registered(model):
    """The review's defect: two-call ASSD with bonus rows was reported as assd-self-bonus."""
    assert assd_decode(model, *_batch(), k=2, bonus=True, seed=0).sampler == "assd-bonus"
    assert assd_decode(model, *_batch(), k=2, bonus=True, drafter="ngram", seed=0).sampler == "assd-ngram-bonus"


def test_keyword_settings_and_spec_decode_alike(model):
    tokens, sigma, n_prompt = _batch(seed=3)
    by_keywords = assd_decode(model, tokens, sigma, n_prompt, k=3, fused=True, outcomes=1, seed=5)
    by_spec = decode(model, SAMPLERS["assd-fused"].replace(k=3, outcomes=1), tokens, sigma, n_prompt, seed=5)
    on_top = assd_decode(model, tokens, sigma, n_prompt, spec=SAMPLERS["assd-fused"], k=3, outcomes=1, seed=5)
    assert torch.equal(by_keywords.tokens, by_spec.tokens) and torch.equal(by_spec.tokens, on_top.tokens)
    def spec_settings(out):
        return {key: value for key, value in out.settings.items() if not isinstance(value, torch.Tensor)}

    assert spec_settings(by_keywords) == spec_settings(by_spec) == SAMPLERS["assd-fused"].replace(
        k=3, outcomes=1).resolve().settings()


def test_resolve_fills_the_drafter_defaults_once():
    self_fused, head_fused = SAMPLERS["assd-fused"].resolve(), SAMPLERS["assd-fused-head"].resolve()
    assert (self_fused.outcomes, self_fused.draft_temperature_ratio, self_fused.bonus) == (2, 1.0, True)
    assert (head_fused.outcomes, head_fused.draft_temperature_ratio) == ("all", 1.0)
    assert head_fused.resolve() == head_fused  # resolving twice changes nothing
    assert SAMPLERS["assd-self-adaptive"].resolve().draft_length.threshold == DEFAULT_ADAPTIVE_THRESHOLD
    explicit = SAMPLERS["assd-fused-head"].replace(outcomes=2, draft_temperature_ratio=1.3).resolve()
    assert (explicit.outcomes, explicit.draft_temperature_ratio) == (2, 1.3)


@pytest.mark.parametrize("settings, message", [
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
    ({"temperature_mode": "hot"}, "temperature_mode must be one of"),
    ({"r_atol": -1.0}, "r_atol must be >= 0"),
    ({"draft_temperature_ratio": 0.0}, "draft_temperature_ratio must be a finite number > 0"),
    ({"fused": True, "outcomes": 0}, "outcomes must be 'all' or an integer >= 1"),
    ({"draft_length": 2.0}, "draft_length is not valid: the adaptive-length threshold must lie in"),
    ({"drafter": "head", "proposal_dtype": "int8"}, "proposal_dtype must be one of float32, bfloat16"),
    ({"proposal_dtype": "float16"}, "proposal_dtype applies to draft-head drafts only"),
])
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(SettingError, match=message) as caught:
        SamplerSpec(**settings).resolve()
    assert caught.value.setting == next(iter(settings.keys() - {"fused", "drafter"}))
    flags = {"temperature_mode": "--temperature-mode", "r_atol": "--r-atol", "draft_length": "--adaptive-threshold",
             "draft_temperature_ratio": "--draft-temperature-ratio", "proposal_dtype": "--proposal-dtype"}
    flag = flags.get(caught.value.setting, f"--{caught.value.setting}")
    assert str(caught.value.for_command_line()).startswith(f"{flag} ")


def test_the_draft_heads_dtype_is_resolved_for_the_model_and_recorded(model, monkeypatch):
    """Unset, the head runs in the device's default dtype (asarm.sampling.drafters.proposal_dtype); set, in the one
    given; a decode's settings say which. A model without a head has nothing to set it for."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert SAMPLERS["assd-auto"].resolve(model).proposal_dtype == "float16"
    assert SAMPLERS["assd-head"].resolve(model).proposal_dtype == "float16"
    assert SAMPLERS["assd-fused"].resolve(model).proposal_dtype is None  # the model's own drafts: no head
    explicit = SAMPLERS["assd-fused-head"].replace(proposal_dtype="bfloat16").resolve(model)
    assert explicit.proposal_dtype == "bfloat16" and explicit.resolve(model) == explicit
    tokens, sigma, n_prompt = _batch()
    out = decode(model, explicit, tokens, sigma, n_prompt, seed=0)
    assert out.settings["proposal_dtype"] == "bfloat16"
    with pytest.raises(SettingError, match="proposal_dtype applies to draft-head drafts only, and assd-auto"):
        SAMPLERS["assd-auto"].replace(proposal_dtype="float32").resolve(tiny_model(seed=0))


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown sampler setting.*kk"):
        SAMPLERS["assd-self"].replace(kk=3)


def test_a_head_sampler_without_a_head_fails_before_decoding():
    plain = tiny_model(seed=0)
    with pytest.raises(ValueError, match="assd-head, assd-fused-head need a draft head and 'plain' has none"):
        resolve_samplers([SAMPLERS[n] for n in ("sequential", "assd-head", "assd-fused-head")], plain, "plain")
    assert [s.name for s in resolve_samplers([SAMPLERS["assd-self"]], plain, "plain")] == ["assd-self"]


def _parsed(argv):
    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser, every_command=True)
    return sampler_overrides(parser.parse_args(argv), every_command=True)


def test_list_overrides_go_to_the_samplers_they_apply_to():
    names = "sequential,assd-self,assd-fused,assd-fused-adaptive"
    seq, two_call, fused, adaptive = parse_samplers(names, _parsed(["--k", "3", "--outcomes", "1",
                                                                    "--adaptive-threshold", "0.5"]))
    assert (seq.name, two_call.k, fused.k, adaptive.k) == ("sequential", 3, 3, 3)
    assert (two_call.outcomes, fused.outcomes, adaptive.outcomes) == (None, 1, 1)
    assert (two_call.draft_length, fused.draft_length, adaptive.draft_length) == (None, None, 0.5)
    assert [s.name for s in (seq, two_call, fused, adaptive)] == names.split(",")
    # a setting given for a list that none of its samplers takes is an error, not silently dropped
    with pytest.raises(ValueError, match="--outcomes applies to none of the samplers sequential, assd-self"):
        parse_samplers("sequential,assd-self", _parsed(["--outcomes", "1"]))
    # settings left at their defaults are fine for any list
    assert [s.k for s in parse_samplers("sequential", _parsed([]))] == [5]


@pytest.mark.parametrize("k, generated", [(5, 10), (3, 10), (2, 7), (4, 1)])
def test_assd_paper_nfe_matches_its_analytical_value(k, generated):
    """assd-paper (the paper's ASSD: self drafts at the target temperature, two calls a round, no bonus) on a
    model whose conditionals do not depend on the context (all weights zero: uniform): every draft is accepted,
    so a round of ``c = min(left, k)`` drafts costs a draft call plus a verify call, or the draft call alone
    when c = 1 (the exact first draft needs no verification)."""
    model = tiny_model(seed=0, init_std=0.0)
    seq_len = generated + 2
    tokens = torch.randint(7, 10, (3, seq_len), generator=torch.Generator().manual_seed(0))
    sigma = orders.any_subset(torch.full((3,), 2), seq_len, batch_size=3, generator=torch.Generator().manual_seed(1))
    out = decode(model, SAMPLERS["assd-paper"].replace(k=k), tokens, sigma, torch.full((3,), 2), seed=0)
    rounds = [min(k, generated - done) for done in range(0, generated, k)]
    assert out.sampler == "assd-paper" and out.settings["draft_temperature_ratio"] == 1.0
    assert out.nfe.tolist() == [sum(1 + (c > 1) for c in rounds)] * 3
    assert out.accepted.tolist() == [generated] * 3
