"""User mistakes (data, config, checkpoint, arguments) that the command-line tools report as one ``ERROR:`` line."""
import argparse
import ast
import sys


class UserInputError(Exception):
    """A problem with the user's data, config or checkpoint; the tools print it without a traceback."""


def error_message(error):
    """The message of a user error, also when it was re-raised from a DataLoader worker."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith('Caught '):
        return lines[-1].split(': ', 1)[-1]
    return str(error)


def run_command(parser, command, argv=None) -> int:
    """Parse ``argv`` with ``parser`` and call ``command(args)``; a :class:`UserInputError` is printed as one
    ``ERROR:`` line on stderr and gives exit code 2 (0 otherwise)."""
    args = parser.parse_args(argv)
    try:
        command(args)
    except UserInputError as e:
        print(f'ERROR: {error_message(e)}', file=sys.stderr)
        return 2
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad arguments reported as one ``ERROR:`` line (exit 2) instead of usage + message."""

    def error(self, message):
        sys.stderr.write(f"ERROR: {self.prog}: {message} (see --help)\n")
        sys.exit(2)


class ParseKwargs(argparse.Action):
    """``--model-kwargs k=v ...`` into a dict, values read as Python literals (else kept as strings), as timm's
    ``ParseKwargs``, with an argument error for an item without ``=``."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key:
                parser.error(f"argument {option_string}: expected key=value items, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)
