"""The search plot: a title that says which search ran, and plain percent labels on its log
axis."""

import re

import pytest

from ticketctl.plots import density_ticks, plot_search, search_figure, search_title
from ticketctl.prune.search import Round, SearchConfig


def _labels(fig):
    fig.canvas.draw()  # tick labels are set when the figure is drawn
    ax = fig.axes[0]
    return ([t.get_text() for t in ax.get_xticklabels()],
            [t.get_text() for t in ax.get_xticklabels(minor=True)])


def test_titles_say_which_search_ran():
    extreme = SearchConfig()
    fixed = SearchConfig(mode="fixed", rounds=12, rates=[0.2])
    assert search_title("resnet20", "cifar10", extreme) == \
        "resnet20 on cifar10: extreme-ticket search"
    title = search_title("digits_cnn", "digits", fixed)
    assert title == "digits_cnn on digits: fixed-rate IMP, 12 rounds at rate 0.2"
    assert "extreme" not in title
    rounds = [Round(i, 0.2, 90.0, True, density=0.8 ** i) for i in range(1, 13)]
    fig = search_figure(rounds, 95.0, title)
    assert fig.axes[0].get_title() == title


@pytest.mark.parametrize("lowest, expected", [
    (1.0, [1, 2, 5, 10, 20, 50, 100]),
    (1.5, [2, 5, 10, 20, 50, 100]),
    (0.3, [0.5, 1, 2, 5, 10, 20, 50, 100]),
    (0.01, [0.01, 0.1, 1, 10, 100]),  # 1-2-5 would be 13 labels: decades
    (50.0, [50, 60, 70, 80, 90, 100]),  # 1-2-5 would be 2: finer
    (99.5, [99.5, 100]),
])
def test_density_ticks(lowest, expected):
    assert density_ticks(lowest) == pytest.approx(expected)


def test_the_log_axis_has_plain_labels(tmp_path):
    rounds = [Round(i, 0.5, 90.0 - i, i != 2, density=0.5 ** i) for i in range(1, 7)]
    fig = search_figure(rounds, 95.0, tolerance=1.0)
    major, minor = _labels(fig)
    # densities 100% down to 1.5625%: 1-2-5 steps inside, as plain numbers
    assert major == ["2", "5", "10", "20", "50", "100"]
    assert all(re.fullmatch(r"\d+(\.\d+)?", t) for t in major)
    assert all(t == "" for t in minor)  # no 2x10^1 style minor labels
    path = plot_search(rounds, 95.0, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_narrow_range_has_plain_labels_too():
    # three rounds at rate 0.2 stay within one decade, where Matplotlib's own log labels
    # turn to 2x10^1 notation
    rounds = [Round(i, 0.2, 90.0, True, density=0.8 ** i) for i in range(1, 4)]
    major, minor = _labels(search_figure(rounds, 95.0))
    assert major == ["60", "70", "80", "90", "100"]
    assert all(t == "" for t in minor)
