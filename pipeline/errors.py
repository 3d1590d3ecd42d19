"""The one exception type for user mistakes: the CLI prints its message and exits with code 2."""


class UserError(Exception):
    """Bad params, a missing or malformed input file, an unreachable source: anything the user fixes.

    Bugs raise anything else and keep their traceback.
    """
