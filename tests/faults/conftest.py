"""The fault suite's marker, and its reports tagged for the counts in ``tests/_fault_tally.py``.

``@fault(kind, expect)`` marks a case: its class of input and the expected outcome ("error":
a clear error; "correct": a correct result).
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "fault(kind, expect): a fault-suite case (class of input, expected outcome)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Tag a fault case's reports with its (kind, expect), so they travel with the report (to
    the controller process when pytest-xdist runs the tests in workers)."""
    rep = yield
    marker = item.get_closest_marker("fault")
    if marker is not None:
        rep.user_properties = [*rep.user_properties, ("fault", tuple(marker.args))]
    return rep
