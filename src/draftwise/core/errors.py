"""User-facing errors: anything the caller can fix gets one of these, never a traceback."""


class DraftwiseError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
