"""A pytest plugin for bench/gpu.py: every test's outcome goes to a JSON-lines file the moment it is known, and the
session stops cleanly once a deadline passes, so a run cut short by its time budget still says what passed.

    python -m pytest -p bench._pytest_budget --budget-log results.jsonl --budget-deadline <unix time> tests

Works with pytest-xdist: the controller writes the log and stops the session; the workers only run tests.
"""

import json
import time

import pytest

_state = {}


def pytest_addoption(parser):
    parser.addoption("--budget-log", help="append each test outcome to this JSON-lines file")
    parser.addoption("--budget-deadline", type=float, help="stop starting tests after this unix time")


def _controller(config) -> bool:
    return not hasattr(config, "workerinput")


def _write(config, record: dict) -> None:
    path = config.getoption("budget_log")
    if path and _controller(config):
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")


def pytest_sessionstart(session):
    _state["session"] = session


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput") and not session.config.pluginmanager.hasplugin("dsession"):
        _write(session.config, {"collected": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    if not _state.get("collected"):
        _state["collected"] = True
        _write(node.config, {"collected": len(ids)})


def pytest_runtest_logreport(report):
    session = _state.get("session")
    if session is None or not _controller(session.config):
        return
    if report.when == "call" or report.outcome != "passed":  # a test's result, or its setup/teardown failing
        first_lines = "\n".join(str(report.longrepr).splitlines()[-6:]) if report.failed else ""
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        _write(session.config, {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
                                "message": first_lines})
    deadline = session.config.getoption("budget_deadline")
    if deadline and time.time() > deadline and not session.shouldstop:
        session.shouldstop = "the time budget for tests is spent"
        _write(session.config, {"stopped": session.shouldstop})
