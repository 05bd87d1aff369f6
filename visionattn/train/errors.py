"""The error type of user mistakes (data, config, checkpoint) that the command-line tools print as one line."""


class UserInputError(Exception):
    """A problem with the user's data, config or checkpoint; the tools print it without a traceback."""


def error_message(error):
    """The message of a user error, also when it was re-raised from a DataLoader worker."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith('Caught '):
        return lines[-1].split(': ', 1)[-1]
    return str(error)
