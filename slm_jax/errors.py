"""The one exception type for mistakes a user can make (config, corpus, checkpoint, bits).

CLIs catch it and print a single line with exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in what the user asked for, explained in one line."""
