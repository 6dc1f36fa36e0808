"""The one base class for user mistakes; the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A mistake in what the user asked for (config, names, files); the message says the fix."""
