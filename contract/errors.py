"""Errors a person reads: each names the file, key or record at fault and what was expected."""


class UniterError(Exception):
    """Base of every error the CLI reports as a one-paragraph message (no traceback)."""


class ConfigError(UniterError):
    """The config file is unreadable or invalid."""


class MissingInputError(UniterError):
    """A stage's input artifact is not built for the current config."""


class InputDataError(UniterError):
    """An input file is malformed as a whole (not one bad record: those are rejected)."""


class GuardError(UniterError):
    """A stage stopped before publishing because its result looks wrong (e.g. dedup would remove
    most of the corpus); the message says what it saw and how to override."""
