"""Errors raised by the sync engine.

Every error carries a machine-readable ``reason`` and a one-line message that says what is
wrong and with which bundle, table or column, so the CLI and the Datasette endpoints can show
it as-is.
"""


class SyncError(Exception):
    """A user-facing sync error.

    :param reason: a short machine-readable code such as ``hash_mismatch``
    :param message: one readable line
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class BundleError(SyncError):
    """The bundle is invalid, tampered with, or cannot be applied to this database."""
