"""User-facing errors: the CLI prints one line and exits with status 2 (no traceback unless --debug)."""


class UserError(Exception):
    """Bad input from the user (config key, file, model, reward). The message names the culprit."""


class RewardError(UserError):
    """A reward function raised or returned something unusable; the message names the function."""
