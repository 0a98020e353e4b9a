"""The one exception type users see: a message that names the problem and the fix."""


class QRecoverError(Exception):
    """Bad input or an unusable state. The CLI prints the message without a traceback."""
