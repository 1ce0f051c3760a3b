"""The one exception the converter raises for bad inputs (the CLI prints it without a traceback)."""


class ConversionError(Exception):
    """A checkpoint or an option the converter cannot use; the message names the value and what was expected."""
