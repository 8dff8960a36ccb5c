"""The one error the commands raise: its own module, so the group modules and the package's
``main`` that imports them share it without an import circle."""


class CliError(Exception):
    """A failure to report in one line, with the command's ``error_status`` (1 for the cluster's
    commands, 2 for the others)."""
