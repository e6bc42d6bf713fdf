"""What every `byol-fast` subcommand's parser does alike: short errors with a did-you-mean hint, no prefix
matching, readable type errors.

argparse's defaults fit poorly with commands of 30 flags: a mistyped flag printed the whole usage (26
lines) above the error; `--epoch 3` was silently taken as `--epochs 3` (prefix matching); `--workers abc`
said "invalid int value" (and a custom type "invalid <class 'int'> value"). Lives here, in the lower of
the two packages, because the data tools' commands use it too.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser without prefix matching whose errors are one line plus a hint.

    `aliases` maps flags people reach for out of habit to the right one and what it means, e.g.
    {"--batch-size": "--global-batch (images per step over all ranks)"}; other unknown flags get the
    closest real flag, if one is close.
    """

    def __init__(self, *args, aliases: dict[str, str] | None = None, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.aliases = aliases or {}

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        namespace, unknown = self.parse_known_args(self._argv, namespace)
        if unknown:
            self.error(self._unrecognized(unknown))
        return namespace

    def error(self, message: str) -> NoReturn:
        # "argument --workers: 'abc' is not an integer" -> "--workers: ..."; no usage block above it.
        message = re.sub(r"^argument ", "", message)
        if not message.startswith("unrecognized"):
            # Another error may stem from a mistyped flag: `--image 8` leaves the required --images unset.
            known = set(_option_strings(self))
            mistyped = [token for token in getattr(self, "_argv", []) if token.startswith("--")
                        and token.split("=", 1)[0] not in known]
            if mistyped:
                message += f" ({self._unrecognized(mistyped)})"
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every option)\n")

    def _unrecognized(self, unknown: list[str]) -> str:
        flags = [token.split("=", 1)[0] for token in unknown if token.startswith("--")]
        hints = [(flag, self._suggestion(flag)) for flag in flags]
        hints = [(flag, hint) for flag, hint in hints if hint]
        text = f"unrecognized argument{'s' * (len(unknown) > 1)}: {' '.join(unknown)}"
        if len(hints) == 1:
            return f"{text}; did you mean {hints[0][1]}?"
        if hints:
            return f"{text}; did you mean {', '.join(f'{hint} for {flag}' for flag, hint in hints)}?"
        return text

    def _suggestion(self, flag: str) -> str | None:
        if flag in self.aliases:
            return self.aliases[flag]
        close = difflib.get_close_matches(flag, _option_strings(self), n=1, cutoff=0.75)
        return close[0] if close else None


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option of `parser` and of its subcommands."""
    options = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        options += [option for option in action.option_strings if option.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options += _option_strings(sub)
    return options


def integer(text: str) -> int:
    """An argparse `type` for whole numbers whose error reads "'abc' is not an integer"."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def number(text: str) -> float:
    """An argparse `type` for real numbers whose error reads "'abc' is not a number"."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
