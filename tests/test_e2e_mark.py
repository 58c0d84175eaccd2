"""The check in tests/conftest.py that keeps the ``e2e`` mark true, run on a small suite.

The small suite runs in this process (pytester) under a copy of tests/conftest.py. Its
tests try to start a process with a program that does not exist, so nothing starts;
this test is marked e2e because the outer check sees those attempts too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SUITE = """
import socket
import subprocess

import pytest


def start_nothing():
    with pytest.raises(FileNotFoundError):
        subprocess.run(["/nonexistent/opticam-e2e-probe"])


def test_unmarked_subprocess():
    start_nothing()


@pytest.mark.e2e
def test_marked_subprocess():
    start_nothing()


def test_unmarked_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)


def test_unmarked_server_fixture(s3_endpoint):
    raise AssertionError("the check fails the test before the server starts")


def test_unmarked_plain():
    assert sum(range(4)) == 6
"""


@pytest.mark.e2e
def test_unmarked_tests_that_start_something_fail(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\naddopts = --strict-markers\nmarkers =\n    e2e: end to end\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2, errors=1)
    result.stdout.fnmatch_lines(
        [  # setup errors are listed before failures
            "*test_unmarked_server_fixture uses the fixture s3_endpoint*e2e mark*",
            "*test_unmarked_subprocess started a subprocess*opticam-e2e-probe*e2e mark*",
            "*test_unmarked_server started a server listening on*e2e mark*",
        ]
    )
