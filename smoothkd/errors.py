"""User-facing errors: the CLI prints these as one clear message, without a traceback."""


class SmoothkdError(Exception):
    """A problem the user can fix (bad input, bad option, a store that does not match)."""


class InputError(SmoothkdError):
    """Bad input data; the message names the file, line and field."""


class StoreError(SmoothkdError):
    """A soft-label store that cannot be opened, written or trusted."""
