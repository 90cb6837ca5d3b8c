"""Errors that stop the server from starting."""


class StartupError(Exception):
    """The server cannot start; the message says why and what to do, in one line."""
