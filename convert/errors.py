"""The one exception the converter reports to the user as a single line."""

from __future__ import annotations


class ConvertError(Exception):
    """A conversion failure: printed as `convert: error: <message>`, exit status 1."""
