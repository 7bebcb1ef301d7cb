"""The one exception type for bad user input; the CLI turns it into a one-line error."""

from __future__ import annotations


class InputError(ValueError):
    """A file, layer, value or option supplied by the user is unusable. The message names it."""
