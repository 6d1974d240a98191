"""The shared plot helpers: a slot with nothing measured is a gap, not a zero, and the legend hides no data."""

import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from asarm.eval.plots import index_lines  # noqa: E402

# Points in every corner of the axes, where a legend inside them would land; one sampler's slot 3 drew no draft.
RATES = {"assd-self": [1.0, 0.9, None, 0.95, 1.0], "assd-fused": [1.0, 0.05, 0.02, 1.0, 0.01],
         "assd-fused-head": [0.0, 1.0, 0.5, 0.0, 1.0]}


@pytest.fixture(scope="module")
def drawn():
    fig = index_lines(RATES, "draft index", "acceptance rate", "ASSD acceptance by draft index")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return fig, canvas.get_renderer()


def test_a_slot_without_drafts_is_a_gap_not_a_zero(drawn):
    fig, _ = drawn
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines) == list(RATES)
    y = np.asarray(lines["assd-self"].get_ydata(), dtype=float)
    assert math.isnan(y[2]) and not np.isnan(np.delete(y, 2)).any()
    assert list(lines["assd-self"].get_xdata()) == [1, 2, 3, 4, 5]
    others = [np.asarray(line.get_ydata(), dtype=float) for name, line in lines.items() if name != "assd-self"]
    assert not any(np.isnan(y).any() for y in others)


def test_the_legend_covers_no_data_point(drawn):
    fig, renderer = drawn
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    names = [text.get_text() for text in legend.get_texts()]
    assert names == list(RATES)
    ax = fig.axes[0]
    assert not box.overlaps(ax.get_window_extent(renderer))  # outside the axes, so clear of any data
    for line in ax.get_lines():
        points = ax.transData.transform(line.get_xydata())
        points = points[~np.isnan(points).any(axis=1)]
        margin = line.get_markersize()  # a marker's radius in points is about this many pixels at the default dpi
        assert not any(box.x0 - margin <= x <= box.x1 + margin and box.y0 - margin <= y <= box.y1 + margin
                       for x, y in points), line.get_label()
    assert box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0  # and still inside the saved picture
