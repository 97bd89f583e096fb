"""User-facing errors: one line that says what is wrong, where, and what to do."""

USAGE = 2  # bad input: recipe, data, missing file, unknown model
FAILED = 1  # the run itself failed
INTERRUPTED = 130  # Ctrl-C or SIGTERM: a checkpoint was saved


class FtuneError(Exception):
    """An error caused by the user's input; the CLI prints it as one `error:` line."""

    def __init__(self, message: str, exit_code: int = USAGE):
        super().__init__(message)
        self.exit_code = exit_code
