"""The summary bar charts: the legend never covers the x-axis label or the tick labels."""
from __future__ import annotations

import pytest

from safedl.report import figures


def _m(v):
    return {"value": v, "ci95": [max(0, v - 0.05), min(1, v + 0.05)], "n": 100}


@pytest.mark.parametrize("groups", [["spectral_signatures vs static_patch", "data_cleaning vs label_flipping"],
                                    ["a vs b"], [f"defense_{i} vs attack_{i}" for i in range(5)]])
@pytest.mark.parametrize("n_series", [2, 3])
def test_legend_clear_of_axis_label(groups, n_series):
    names = ["before", "after", "defended, adaptive attack"][:n_series]
    series = {n: [_m(0.2 + 0.1 * k) for _ in groups] for k, n in enumerate(names)}
    fig, ax = figures.grouped_bars_figure(groups, series, title="t", ylabel="attack success rate",
                                          xlabel="defense vs attack")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(r)
    assert not legend.overlaps(ax.xaxis.label.get_window_extent(r))
    for t in ax.get_xticklabels():
        assert not legend.overlaps(t.get_window_extent(r))
    assert not legend.overlaps(ax.get_window_extent(r))  # nor the bars
