"""The one error of the security tools: its message says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["SecurityError"]


class SecurityError(ValueError):
    """Bad input (an invalid or taken name, an unknown account) or a security folder that is missing,
    incomplete or already set up."""
