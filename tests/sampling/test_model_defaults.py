"""Sampler defaults stored with a model (asarm.json) and its draft head (draft_head.json): resolution, their
precedence under the user's settings, bad stored values, the measurement's rule, and the export that
re-measures them (scripts/export_model.py)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asarm import orders
from asarm.draft_head import HEAD_CONFIG
from asarm.eval.sampler_defaults import Runs, _clearly_better
from asarm.model import ASARM, ModelLoadError
from asarm.sampling import SAMPLERS, assd_decode, decode
from asarm.sampling.spec import (DEFAULT_ADAPTIVE_THRESHOLD, DEFAULT_DRAFT_TEMPERATURE_RATIO, DEFAULT_OUTCOMES,
                                 HEAD_OUTCOMES, LIBRARY)

from helpers import random_head, tiny_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "export_model.py"


def _saved(directory: Path, head: bool = False, model_defaults=None, head_defaults=None, **config) -> Path:
    """A tiny model saved in ``directory`` (with a random draft head), with sampler defaults written in."""
    model = tiny_model(seed=0, init_std=0.5, **config)
    if head:
        model.attach_draft_head(random_head(model, seed=1))
    model.save_pretrained(directory)
    for name, values in (("asarm.json", model_defaults), (HEAD_CONFIG, head_defaults)):
        if values is not None:
            fields = json.loads((directory / name).read_text())
            (directory / name).write_text(json.dumps(fields | {"sampler_defaults": values}))
    return directory


def _batch(batch_size=4, seq_len=10):
    gen = torch.Generator().manual_seed(0)
    n_prompt = torch.full((batch_size,), 2)
    sigma = orders.any_subset(n_prompt, seq_len, batch_size=batch_size, generator=gen)
    return torch.randint(7, 10, (batch_size, seq_len), generator=gen), sigma, n_prompt


def test_stored_defaults_fill_what_the_user_left_unset(tmp_path):
    stored = {"draft_temperature_ratio": 1.25, "outcomes": 3, "outcome_order": "accepted-first",
              "adaptive_threshold": 0.6, "measured": {"decodes": 4}}
    model = ASARM.from_pretrained(_saved(tmp_path, model_defaults=stored), device="cpu")
    file = str(tmp_path / "asarm.json")
    fused = SAMPLERS["assd-fused-adaptive"].resolve(model)
    assert (fused.draft_temperature_ratio, fused.outcomes, fused.outcome_order, fused.draft_length.threshold) == \
        (1.25, 3, "accepted-first", 0.6)
    assert dict(fused.defaults_from) == dict.fromkeys(
        ("outcomes", "outcome_order", "draft_temperature_ratio", "draft_length"), file)
    # the decode uses them: the same tokens as the explicit settings on a model without stored defaults
    tokens, sigma, n_prompt = _batch()
    out = assd_decode(model, tokens, sigma, n_prompt, seed=torch.arange(4))
    plain = assd_decode(tiny_model(seed=0, init_std=0.5), tokens, sigma, n_prompt, seed=torch.arange(4),
                        draft_temperature_ratio=1.25)
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.nfe, plain.nfe)
    assert out.sampler == "assd-self" and out.settings["defaults_from"] == {"draft_temperature_ratio": file}
    # what the user sets wins, and is not reported as a default
    explicit = SAMPLERS["assd-fused"].replace(draft_temperature_ratio=2.0, outcomes="all").resolve(model)
    assert (explicit.draft_temperature_ratio, explicit.outcomes, explicit.outcome_order) == (2.0, "all",
                                                                                           "accepted-first")
    assert dict(explicit.defaults_from) == {"outcome_order": file}
    assert SAMPLERS["assd-self-adaptive"].replace(draft_length=0.1).resolve(model).draft_length.threshold == 0.1
    assert explicit.resolve(model) == explicit  # resolving twice changes nothing


def test_a_model_without_stored_defaults_uses_the_librarys(tmp_path):
    model = ASARM.from_pretrained(_saved(tmp_path), device="cpu")
    spec = SAMPLERS["assd-fused-adaptive"].resolve(model)
    assert (spec.draft_temperature_ratio, spec.outcomes, spec.draft_length.threshold) == \
        (DEFAULT_DRAFT_TEMPERATURE_RATIO, DEFAULT_OUTCOMES, DEFAULT_ADAPTIVE_THRESHOLD)
    assert set(dict(spec.defaults_from).values()) == {LIBRARY}
    assert SAMPLERS["assd-self"].resolve(model).name == "assd-self"  # a default is not a choice of assd-paper


def test_a_stored_ratio_of_one_keeps_the_samplers_name(tmp_path):
    """The paper's settings by default are still reported as the sampler asked for; set by the user, as assd-paper."""
    model = ASARM.from_pretrained(_saved(tmp_path, model_defaults={"draft_temperature_ratio": 1.0}), device="cpu")
    tokens, sigma, n_prompt = _batch()
    default = assd_decode(model, tokens, sigma, n_prompt, seed=0)
    paper = decode(model, SAMPLERS["assd-paper"], tokens, sigma, n_prompt, seed=0)
    assert (default.sampler, paper.sampler) == ("assd-self", "assd-paper")
    assert torch.equal(default.tokens, paper.tokens) and torch.equal(default.nfe, paper.nfe)


def test_head_defaults_live_with_the_head(tmp_path):
    directory = _saved(tmp_path / "m", head=True, head_defaults={"draft_temperature_ratio": 1.3, "outcomes": 2})
    model = ASARM.from_pretrained(directory, device="cpu")
    head = SAMPLERS["assd-fused-head"].resolve(model)
    assert (head.draft_temperature_ratio, head.outcomes, head.outcome_order) == (1.3, 2, "accepted-first")
    assert dict(head.defaults_from) == {"draft_temperature_ratio": str(directory / HEAD_CONFIG),
                                        "outcomes": str(directory / HEAD_CONFIG), "outcome_order": LIBRARY}
    own = SAMPLERS["assd-fused"].resolve(model)  # the model's own drafts: asarm.json has none
    assert (own.draft_temperature_ratio, own.outcomes) == (DEFAULT_DRAFT_TEMPERATURE_RATIO, DEFAULT_OUTCOMES)
    model.attach_draft_head(random_head(model, seed=2))  # another head: not the stored head's defaults
    assert SAMPLERS["assd-fused-head"].resolve(model).outcomes == HEAD_OUTCOMES


@pytest.mark.parametrize("stored, message", [
    ({"draft_temperature_ratio": -1}, "sampler default draft_temperature_ratio must be a finite number > 0"),
    ({"outcomes": 0}, "sampler default outcomes must be 'all' or an integer >= 1"),
    ({"outcome_order": "random"}, "sampler default outcome_order must be one of"),
    ({"adaptive_threshold": 1.5}, "sampler default adaptive_threshold is not valid"),
    ({"draft_temprature_ratio": 1.0}, "unknown sampler default 'draft_temprature_ratio'"),
])
def test_a_bad_stored_default_is_one_line_naming_the_file(tmp_path, stored, message):
    model = ASARM.from_pretrained(_saved(tmp_path, model_defaults=stored), device="cpu")
    with pytest.raises(ValueError, match=message) as err:
        assd_decode(model, *_batch(), seed=0, fused=True, draft_length="adaptive")
    assert str(err.value).startswith(f"{tmp_path / 'asarm.json'}: ") and "\n" not in str(err.value)


def test_stored_defaults_that_are_not_an_object_fail_the_load(tmp_path):
    with pytest.raises(ModelLoadError, match=r"asarm.json: sampler_defaults must be an object"):
        ASARM.from_pretrained(_saved(tmp_path, model_defaults=[1.0]), device="cpu")


def _runs(nfe, rows_per_call):
    nfe = np.array(nfe, dtype=float)
    return Runs(nfe, np.full_like(nfe, 100.0), nfe * np.array(rows_per_call, dtype=float))


def test_a_default_changes_only_on_clear_evidence():
    base = _runs([50, 60, 55, 52], [4, 4, 4, 4])
    fewer_calls = _runs([45, 54, 50, 47], [4, 4, 4, 4])
    trade = _runs([45, 54, 50, 47], [6, 6, 6, 6])  # fewer calls, more rows each
    noise = _runs([49, 62, 53, 53], [4, 4, 4, 4])
    assert _clearly_better("draft_temperature_ratio", base, fewer_calls)
    assert _clearly_better("outcomes", base, fewer_calls)
    assert _clearly_better("draft_temperature_ratio", base, trade)  # the ratio does not shape the calls
    assert not _clearly_better("outcomes", base, trade) and not _clearly_better("adaptive_threshold", trade, base)
    assert not _clearly_better("draft_temperature_ratio", base, noise)
    assert not _clearly_better("draft_temperature_ratio", base, base)


def _export_script():
    spec = importlib.util.spec_from_file_location("export_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exportable(tmp_path_factory, xlnet_tokenizer):
    """An exported-model directory with a tokenizer and a draft head, trained at 12 tokens."""
    directory = tmp_path_factory.mktemp("exportable")
    model = ASARM.from_config(tokenizer=xlnet_tokenizer, d_model=16, n_layer=1, n_head=2, d_inner=32, seed=0,
                              device="cpu")
    model.attach_draft_head(random_head(model, seed=1))
    model.trained_length = 12
    model.save_pretrained(directory)
    return directory


def test_export_measures_the_defaults_and_stores_them(exportable, tmp_path, capsys):
    export_model = _export_script()
    dest = tmp_path / "out"
    assert export_model.main([str(exportable), str(dest), "--defaults-decodes", "3"]) == 0
    assert "sampler defaults measured on 3 decodes (12-token texts" in capsys.readouterr().out
    model = ASARM.from_pretrained(dest, device="cpu")
    for drafter, sampler, file in (("self", "assd-fused", "asarm.json"), ("head", "assd-fused-head", HEAD_CONFIG)):
        stored = json.loads((dest / file).read_text())["sampler_defaults"]
        assert stored["measured"]["by"] == "scripts/export_model.py" and stored["measured"]["decodes"] == 3
        spec = SAMPLERS[sampler].resolve(model)
        assert (spec.draft_temperature_ratio, spec.outcomes) == (stored["draft_temperature_ratio"], stored["outcomes"])
        assert set(dict(spec.defaults_from).values()) == {str(dest / file)}, drafter


def test_export_can_skip_the_measurement_and_says_so(exportable, tmp_path, capsys):
    export_model = _export_script()
    assert export_model.main([str(exportable), str(tmp_path / "out"), "--skip-defaults"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "sampler defaults not measured (--skip-defaults): decodes with this model use the library's"
    assert "sampler_defaults" not in json.loads((tmp_path / "out" / "asarm.json").read_text())
