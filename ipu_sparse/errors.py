"""Errors a user can cause (bad paths, bad values, bad files).

The CLI prints these as one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """An error caused by input: a missing or corrupt file, a bad value, an unknown name."""
