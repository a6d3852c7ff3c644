"""The error type for a user's mistake: shown as one paragraph, never as a traceback."""


class UserError(Exception):
    """A problem in the job, its data or its paths that the user can fix; the message says how."""
