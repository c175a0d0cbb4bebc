"""The errors a user can cause: the CLI reports them in one line, exit code 2 (75 when transient)."""


class PipelineError(ValueError):
    """Bad input, params or environment, with a message naming the file, line or key."""


class TransientError(PipelineError):
    """A failure that may pass when retried later (a network outage): exit code 75, sysexits.h's EX_TEMPFAIL,
    which the Prefect flow retries on."""

    exit_code = 75
