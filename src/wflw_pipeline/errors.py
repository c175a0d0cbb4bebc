"""The one base class of errors a user can cause: the CLI reports them in one line, exit code 2."""


class PipelineError(ValueError):
    """Bad input, params or environment, with a message naming the file, line or key."""
