"""Fixtures shared by every test package: real servers on free loopback ports, corpora and models."""

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.s3server",
    "tests.fixtures.assets",
    "tests.fixtures.models",
]
