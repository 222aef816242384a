"""Errors a user can act on. The CLI prints each as one line and exits with its ``exit_code``."""

from __future__ import annotations


class SplitLMError(Exception):
    """Base class: the message says what was wrong, what was expected and what to do."""

    exit_code = 1


class ConfigError(SplitLMError):
    """The configuration (YAML file or dotted override) is invalid."""

    exit_code = 2


class DataError(SplitLMError):
    """A data file or dataset could not be read or has the wrong shape."""

    exit_code = 3


class ModelError(SplitLMError):
    """A model could not be found, loaded or split."""

    exit_code = 4


class CheckpointError(SplitLMError):
    """A checkpoint or run directory is missing, incomplete or inconsistent."""

    exit_code = 5


class ProtocolError(SplitLMError):
    """A message between client and server is malformed or out of order."""

    exit_code = 6


class ClientGone(ProtocolError):
    """Clients stopped answering during a round (disconnected past the grace period, restarted, or timed out).

    The round's work is rolled back and done again without them (``frameworks/driver.py``)."""

    def __init__(self, client_ids: tuple[str, ...] | list[str], reason: str) -> None:
        self.client_ids = tuple(client_ids)
        self.reason = reason
        who = ", ".join(self.client_ids)
        super().__init__(f"client{'s' if len(self.client_ids) > 1 else ''} {who} gone: {reason}")


class PrivacyError(SplitLMError):
    """A defense, an attack or a recorded run cannot be used as asked."""

    exit_code = 7


class ClientsFlagged(PrivacyError):
    """A server-side guard (``privacy.guards``) found clients' updates anomalous in a round.

    Like ``ClientGone``, the round's work is rolled back and done again without them (``frameworks/driver.py``)."""

    def __init__(self, client_ids: tuple[str, ...] | list[str], reason: str) -> None:
        self.client_ids = tuple(client_ids)
        self.reason = reason
        who = ", ".join(self.client_ids)
        super().__init__(f"client{'s' if len(self.client_ids) > 1 else ''} {who} flagged: {reason}")


class HijackAlarm(SplitLMError):
    """The client's detector concluded that the server is hijacking its training; training stopped."""

    exit_code = 8


class Interrupted(SplitLMError):
    """Training was stopped on request (Ctrl-C, SIGTERM); the message says where ``--resume`` continues."""

    exit_code = 130
