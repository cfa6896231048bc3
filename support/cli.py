"""The one-line rule for the helper commands (python -m tools.*, toy.*, support.*, data.py): a bad command line
or a bad file is one line on stderr naming the file and what was expected, exit code 2, no traceback.

    @cli.command                 main(argv) -> exit code; the project's errors become that one line
    cli.at_least(n)              an argparse type: an integer >= n (a flag out of range is refused before work)
    cli.describe(module, doc)    `python -m tools.NAME` of a module other commands use: its docstring, nothing written
train.py, eval.py and predict.py catch the same errors in their own main (they also stop torchrun's processes).
"""
import argparse
import functools
import sys

from support.errors import ONE_LINE, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one UsageError line (exit code 2 in main), not usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def command(main):
    """Wrap main(argv): a project error (and a file the system refuses: OSError) is one line and exit 2."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv) or 0
        except ONE_LINE as err:
            line = " ".join(str(err).split())
        except OSError as err:  # a file that cannot be opened or written, found before the command's own checks
            line = f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")
        except KeyboardInterrupt:
            line = "interrupted (files already written are whole; the others were not written)"
        print(f"error: {line}", file=sys.stderr)
        return 2
    return wrapped


def parser(**kw):
    """argparse whose errors are one UsageError line, for the helpers."""
    return Parser(**kw)


def describe(module, doc, argv=None):
    """The command line of a module that other commands import (tools/explain.py, tools/measure.py, ...): with no
    argument or --help it prints its docstring, which names the command that runs it, and writes nothing."""
    p = parser(prog=f"python -m {module}", formatter_class=argparse.RawDescriptionHelpFormatter,
               description=doc.strip() + "\n\n(used by the commands above: it has no work of its own to run)")

    @command
    def main(argv):
        p.parse_args(argv)  # --help prints and exits; any other argument is a one-line usage error
        p.print_help()
    return main(argv)


def at_least(low):
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {low}")
        return value
    return check
