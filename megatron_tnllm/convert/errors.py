"""What the converter tells the user: the one exception it raises for bad inputs (the CLI prints it without a
traceback) and notes about what it changes or removes."""

import sys


class ConversionError(Exception):
    """A checkpoint or an option the converter cannot use; the message names the value and what was expected."""


class VerificationError(ConversionError):
    """``--verify`` found the converted model's logits too far from the source's (CLI exit status 3)."""


def note(message: str) -> None:
    """A message about what the conversion changes or removes (stderr, so that stdout stays the result)."""
    print(f"note: {message}", file=sys.stderr, flush=True)
