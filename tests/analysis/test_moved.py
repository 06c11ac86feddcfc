"""Names that left the analysis layer raise a one-line AttributeError naming their new home."""

from __future__ import annotations

import importlib

import pytest

from subriemann.analysis.moved import MOVED

OLD_HOMES = [
    ("subriemann.analysis", "plot_critical_set"),
    ("subriemann.analysis", "plot_strata_graph"),
    ("subriemann.analysis.critical", "plot_critical_set"),
    ("subriemann.analysis.strata", "plot_strata_graph"),
    ("subriemann.analysis.cross_entropy", "load_digits_problem"),
    ("subriemann.analysis.cross_entropy", "DigitsProblem"),
]


@pytest.mark.parametrize(("module", "name"), OLD_HOMES)
def test_moved_name_names_its_new_home(module, name):
    old = importlib.import_module(module)
    with pytest.raises(AttributeError, match=f"moved to {MOVED[name]}") as info:
        getattr(old, name)
    assert "\n" not in str(info.value)
    assert not hasattr(old, name)
    assert callable(getattr(importlib.import_module(MOVED[name]), name))  # it lives there


def test_other_missing_names_are_plain_attribute_errors():
    import subriemann.analysis

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        subriemann.analysis.nope  # noqa: B018
