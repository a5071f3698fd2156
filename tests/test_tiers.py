"""The test tiers: conftest.py marks `e2e` every test that starts a process, itself or through a fixture or a
helper, so that `pytest -m "not e2e"` runs the unit tests and `pytest -m "not slow"` the fast tier."""

import subprocess

import pytest

from conftest import starts_a_process
from helpers import tessera


def cli_help():
    tessera("--help")


def through_a_helper():
    return cli_help()


def arithmetic():
    return sum(range(3))


def test_a_function_starts_a_process_when_it_or_a_helper_it_calls_does():
    assert starts_a_process(lambda: subprocess.run(["true"]), set())
    assert starts_a_process(through_a_helper, set())
    assert not starts_a_process(arithmetic, set())


@pytest.fixture
def a_process():
    return subprocess.run(["true"]).returncode


@pytest.fixture
def uses_a_process(a_process):
    return a_process


def test_a_test_whose_fixture_starts_a_process_through_another_is_end_to_end(uses_a_process, request):
    assert request.node.get_closest_marker("e2e")


def test_a_test_that_starts_no_process_is_a_unit_test(tmp_path, request):
    assert not request.node.get_closest_marker("e2e")
