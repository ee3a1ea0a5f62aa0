"""Fixtures shared by every test package: real servers on free loopback ports, corpora and models."""

from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.s3server",
    "tests.fixtures.assets",
    "tests.fixtures.models",
]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests look for whole phrases in the commands' output, and rich folds it at 80 columns: a message
    that names a temporary path would then split a phrase or not, by the length of the path."""
    monkeypatch.setenv("COLUMNS", "400")
    yield
