"""The agent's error tree. Every error an operator can see is a ``KybdrError`` with a message written for
them; anything else escaping a command is a bug and is reported as one."""

from __future__ import annotations


class KybdrError(Exception):
    """An operation failed for a reason the operator can act on; ``str()`` is the explanation."""


class ConfigError(KybdrError):
    """The configuration is invalid; nothing was done (exit status 78, EX_CONFIG)."""


class StoreError(KybdrError):
    """The repository could not be read or written, after retries where retrying made sense."""


class NotFound(StoreError):
    """The object or backup asked for does not exist."""


class DumpError(KybdrError):
    """pg_dump, pg_restore or the database connection failed."""


class IntegrityError(KybdrError):
    """A backup does not verify: checksum, authentication tag, size or archive structure is wrong."""


class KeyUnavailable(KybdrError):
    """No configured key opens an encrypted backup. The backup may be fine: this says nothing about it."""
