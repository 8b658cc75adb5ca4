"""The tabs after the four fixed ones follow the Run selector and the data (issue #15 item 4,
issue #16 item 3), without a browser: each is a ``views.RunTab`` on the store, shown only for a
run with its rows, built when first shown and rebuilt for a new run or new data while shown."""

from __future__ import annotations

from pathlib import Path

import panel as pn
import pytest
from _synthetic import UnitsSpec, write_synthetic_ranks, write_synthetic_units

from dnntrace_viewer import app as A
from dnntrace_viewer.data_store import RunStore, find_traces

pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")


@pytest.fixture()
def session(demo_trace: str, tmp_path: Path) -> tuple[RunStore, dict]:
    units = tmp_path / "units.arrow"
    write_synthetic_units(units, UnitsSpec(units=64, steps=12, cells_per_batch=64 * 4))
    ranks = write_synthetic_ranks(tmp_path / "ranks", ranks=2, steps=5, nan=None, seed=1)
    store = RunStore(paths=[demo_trace, str(units), *find_traces([ranks])])
    pn.state.cache[A.SESSION_VIEWS] = []
    A.build_app(store, follow_ms=None)
    views = pn.state.cache.pop(A.SESSION_VIEWS)[-1]
    return store, views


def test_registry_names_each_tabs_rows() -> None:
    import importlib

    for module, name, rows in A.EXTRA_TABS:
        cls = getattr(importlib.import_module(f"dnntrace_viewer.{module}"), name)
        assert cls.rows == rows and cls.title


def test_extra_tabs_follow_the_run(session: tuple[RunStore, dict]) -> None:
    store, views = session
    extras, tabs = views["extras"], views["tabs"]
    first = len(A.TABS)
    assert store.run == "demo.arrow" and extras.titles == [] and len(tabs) == first

    store.run = "units.arrow"
    assert extras.titles == ["Units"] and tabs._names[first:] == ["Units"]
    units = extras.views["UnitsTab"]
    assert units.builds == 0  # not built until shown
    tabs.active = first
    assert units.builds == 1
    inner = units.box.objects[0]
    assert isinstance(inner, pn.Tabs) and "Units × steps" in inner._names

    store.run = "rank0.arrow"  # no per-unit rows: Units goes, Ranks comes, back to the overview
    assert extras.titles == ["Ranks"] and tabs._names[first:] == ["Ranks"]
    assert tabs.active == 0
    ranks = extras.views["RanksTab"]
    tabs.active = first
    assert ranks.builds == 1 and "Ranks × steps" in ranks.box.objects[0]._names

    store.run = "units.arrow"  # the Units tab is rebuilt for this run when shown again
    assert extras.titles == ["Units"] and units.builds == 1
    tabs.active = first
    assert units.builds == 2 and units._built == (store.run, store.version)


def test_shown_tab_rebuilds_with_new_data_hidden_one_waits(
    session: tuple[RunStore, dict],
) -> None:
    store, views = session
    extras, tabs = views["extras"], views["tabs"]
    store.run = "units.arrow"
    tabs.active = len(A.TABS)
    units = extras.views["UnitsTab"]
    n = units.builds
    store.version += 1  # what RunStore.poll does when a followed file grows
    assert units.builds == n + 1
    tabs.active = 0
    store.version += 1
    assert units.builds == n + 1  # stale, not rebuilt while hidden
    tabs.active = len(A.TABS)
    assert units.builds == n + 2
