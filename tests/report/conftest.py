"""One real Lightning run with every monitor attached, shared by the report tests."""

from __future__ import annotations

import warnings

import pytest

from tests.report.lightning_run import train


@pytest.fixture(scope="session")
def monitored_run(tmp_path_factory):
    """``(logdir, monitors by family, recording logger)`` of one short monitored run."""
    logdir = tmp_path_factory.mktemp("monitored")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitors, recorder, _ = train(logdir)
    return logdir, {m.name: m for m in monitors}, recorder
