"""The help layout both command-line tools share."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout (the exit-code table) and appends "(default: X)" to every option
    with a real default whose help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        no_default = default is None or default is False or default == argparse.SUPPRESS
        if action.option_strings and not no_default and "default" not in text:
            text += " (default: %(default)s)"
        return text
