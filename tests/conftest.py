"""Fixtures shared by every test package: real servers started on free loopback ports."""

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.s3server", "tests.fixtures.assets"]
