"""Errors that the CLI turns into a one-line message and exit status 2."""

from __future__ import annotations


class SpecsearchError(Exception):
    """Bad input or an impossible request. The message is one line naming the file/row and problem."""


class InputError(SpecsearchError):
    """A file or row that cannot be read: corrupt, truncated, wrong shape or missing columns."""


class NotBuiltError(SpecsearchError):
    """A command of the CLI contract that this version does not implement yet."""
