"""The error type for a user's mistake: shown as one paragraph, never as a traceback."""


class UserError(Exception):
    """A problem in the job, its data or its paths that the user can fix; the message says how."""


class TrainingFailed(Exception):
    """The run failed for a reason that is not the user's input; the message is one paragraph, no traceback."""

    exit_code = 1  # the CLI prints the message and exits with it
