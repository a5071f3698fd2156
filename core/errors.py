"""The one exception type for a user's mistake."""


class UserError(Exception):
    """A mistake in the user's input or configuration.

    The message names the file, the field and the fix; the `tessera` command prints it without a traceback
    and exits with status 2. Bugs stay ordinary exceptions, with their tracebacks.
    """
