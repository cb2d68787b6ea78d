"""The one exception type for mistakes in what the user gave the recipe.

`UserError` is raised deliberately, where the recipe checks its input: the command line, the
configuration, data files, model folders, checkpoints, devices. The CLI reports it in one line
with exit code 2 and removes a run folder the command created. Any other exception is a bug
(ours or a library's): it keeps its traceback, exits 1 and leaves the run folder for the
report. A `ValueError`, so code that catches bad arguments as ValueError keeps working.
"""


class UserError(ValueError):
    """A mistake in the user's input, named in one line with what to do instead."""


class ConfigError(UserError):
    """A user error in the configuration (bad key, value, file)."""


class MissingExtraError(ConfigError):
    """The configuration needs an optional dependency that is not installed."""
