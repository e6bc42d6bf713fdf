"""A pytest plugin for the sweep's test section: every test's outcome is appended to the JSON-lines file named by
$BYOL_TEST_ROWS the moment it is known, so a run stopped by its time cap still says which tests passed, failed,
or never ran.

    BYOL_TEST_ROWS=rows.jsonl python -m pytest -p benchmarks.pytest_rows -m cuda

Lines: {"collected": [node ids]} once, then one {"test", "outcome", "seconds", "message"} per test.
"""

from __future__ import annotations

import json
import os

ROWS_ENV = "BYOL_TEST_ROWS"


def _append(record: dict) -> None:
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as rows:
            rows.write(json.dumps(record) + "\n")


def pytest_collection_finish(session) -> None:
    """After -m deselection: the tests that will run, in order."""
    _append({"collected": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report) -> None:
    """One line per test: its call's outcome, or its setup's when the setup skipped or failed it, or a failed
    teardown's (pytest then reports the test twice; the later line wins)."""
    decisive = (report.when == "call" or (report.when == "setup" and not report.passed)
                or (report.when == "teardown" and report.failed))
    if not decisive:
        return
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2].removeprefix("Skipped: ")  # (file, line, reason)
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)  # the assertion or exception line, with its values
        message = " ".join(crash.message.split()) if crash else report.longreprtext.strip()[-300:]
    _append({"test": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 2),
             "message": message[:300]})
