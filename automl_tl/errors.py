"""Errors a user can cause and fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input (config, data, names) that they can fix.

    The message names the problem and the fix; the CLI shows it without a traceback.
    """

    exit_code = 2


class ConfigError(UserError):
    """The study file or a command-line flag has a bad key or value."""


class DataError(UserError):
    """The dataset cannot be used as it is."""


class PluginError(UserError):
    """A plugin failed to load or registered something invalid."""


class UnknownNameError(UserError):
    """A backbone, policy, strategy or dataset name that no plugin registered."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
