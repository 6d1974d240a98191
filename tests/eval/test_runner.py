import argparse
import json

import pytest

from asarm.cli import EVALUATIONS
from asarm.eval.arguments import parse_count_or_all
from asarm.eval.plots import label_bars
from asarm.eval.record import EvalRun


def _finish(tmp_path, capsys, warn=None):
    run = EvalRun("demo", {"out": str(tmp_path / "out"), "seed": 0})
    run.samples([{"x": 1}])
    run.path("plot.png").write_bytes(b"png")
    run.path("never_written.png")  # asked for, never written: not listed
    if warn:
        run.warn(warn)
    results = run.finish({"score": 1.5}, "| a |\n|---|\n| 1 |\n")
    return run, results, capsys.readouterr()


def test_closing_line_and_results_list_every_file_written(tmp_path, capsys):
    run, results, printed = _finish(tmp_path, capsys)
    files = ["results.json", "summary.md", "samples.jsonl", "plot.png"]
    assert results["files"] == files and sorted(p.name for p in run.dir.iterdir()) == sorted(files)
    closing = printed.out.strip().splitlines()[-1]
    assert closing == f"wrote 4 files to {run.dir}: " + ", ".join(files)
    assert json.loads((run.dir / "results.json").read_text())["warnings"] == []
    assert "Warnings" not in (run.dir / "summary.md").read_text()


def test_warnings_stay_out_of_the_metrics(tmp_path, capsys):
    error = "could not load 'gpt2-large': (MaxRetryError('HTTPSConnectionPool(host=...)'))\n  retried 5 times"
    run, results, printed = _finish(tmp_path, capsys, warn=error)
    assert results["metrics"] == {"score": 1.5}
    assert results["warnings"] == [" ".join(error.split())]
    assert "WARNING: could not load" in printed.err
    summary = (run.dir / "summary.md").read_text()
    table, warnings = summary.split("## Warnings")
    assert "MaxRetryError" not in table and "MaxRetryError" in warnings


def test_label_bars_keeps_an_all_zero_panel_readable(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    label_bars(ax, ax.bar(["sequential", "assd-self"], [0.0, 0.0]), [0.0, 0.0])
    assert [t.get_text() for t in ax.texts] == ["0", "0"]
    bottom, top = ax.get_ylim()
    assert bottom <= 0 < top  # the zero line and the labels lie inside the axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sequential", "assd-self"]
    fig.savefig(tmp_path / "zero.png")


def _eval_parser(name):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    EVALUATIONS[name].add_arguments(parser)
    return parser


@pytest.mark.parametrize("name", list(EVALUATIONS))
def test_help_shows_each_default_once(name):
    parser = _eval_parser(name)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            text = formatter._expand_help(action)
            assert text.count("default") <= 1, text


@pytest.mark.parametrize("name, defaults", [
    ("nll", {"num_sequences": 512, "length": 128, "masking_rate": 0.95, "device": None, "threads": None}),
    ("lm-tasks", {"tasks": "lambada,hellaswag", "limit": None, "lambada_file": None, "hellaswag_file": None}),
    ("speculative", {"num_sequences": 8, "outcomes": None, "ppl_stride": None, "model": "asarm-tiny"}),
])
def test_parsed_defaults(name, defaults):
    args = vars(_eval_parser(name).parse_args([]))
    assert {key: args[key] for key in defaults} == defaults


def test_parse_count_or_all():
    assert parse_count_or_all("all") is None and parse_count_or_all(" ALL ") is None
    assert parse_count_or_all("12") == 12
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_count_or_all(bad)
