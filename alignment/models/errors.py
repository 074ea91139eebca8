"""The one error type of the model layer: a one-line message that says what to do.

The CLI turns it into `CliError` (exit 2); the app shows it as is.
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model, adapter or prompt that cannot be used, with the fix in the message."""
