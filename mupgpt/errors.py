"""Bad input is reported as one line that says what to do, with exit status 2 and no traceback."""
import argparse
import difflib
import sys


class UsageError(Exception):
    pass


def exit_on_usage_error(main):
    """Run main(); a UsageError becomes 'error: <message>' on stderr and exit status 2."""
    try:
        return main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (an unknown choice, a number that is not one) are a UsageError: one line, exit 2
    under exit_on_usage_error (argparse's default prints the usage first)."""
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def did_you_mean(word, options):
    """' (did you mean X?)' for the option nearest a misspelt word, or '' when none is near."""
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
