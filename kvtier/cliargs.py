"""Command-line parsing shared by ``kvtier serve | demo | plan | store``.

Bad input gets one line on stderr naming the argument and what it accepts, and
exit status 2, never a traceback: ``ArgumentParser`` prints argparse's errors
that way (no usage block), and the value types below say what they accept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable, NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: argument --x: what it accepts, got 'v'``."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} ({self.prog} -h for help)", file=sys.stderr)
        raise SystemExit(2)


def _type(name: str, conv: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from ``conv`` (which raises ValueError with what it accepts)."""
    def parse(text: str) -> Any:
        try:
            return conv(text)
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise argparse.ArgumentTypeError(msg if "got " in msg else f"{msg}, got {text!r}") \
                from None
    parse.__name__ = name   # argparse names the type in some messages
    return parse


def integer(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    what = (f"an integer from {minimum} to {maximum}" if maximum is not None
            else f"an integer >= {minimum}")

    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise ValueError(f"expected {what}") from None
        if v < minimum or (maximum is not None and v > maximum):
            raise ValueError(f"expected {what}")
        return v
    return _type("integer", conv)


def number(minimum: float = 0.0, *, above: bool = True, maximum: float | None = None,
           allow_inf: bool = False) -> Callable[[str], float]:
    """A float ``> minimum`` (``>=`` when ``above`` is False), ``<= maximum`` if given;
    ``inf`` only when ``allow_inf``."""
    what = f"a number {'>' if above else '>='} {minimum:g}"
    if maximum is not None:
        what += f" and <= {maximum:g}"
    if allow_inf:
        what += " (or 'inf')"

    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"expected {what}") from None
        ok = (v > minimum if above else v >= minimum) and not math.isnan(v)
        ok = ok and (maximum is None or v <= maximum) and (allow_inf or math.isfinite(v))
        if not ok:
            raise ValueError(f"expected {what}")
        return v
    return _type("number", conv)


def json_object(what: str) -> Callable[[str], dict]:
    """A JSON object given on the command line."""
    expected = f"expected a JSON object of {what} such as '{{\"dram_bytes\": \"64GiB\"}}'"

    def conv(text: str) -> dict:
        try:
            v = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{expected}, got {text!r}: not JSON ({e})") from None
        if not isinstance(v, dict):
            raise ValueError(f"{expected}, got {text!r}: a JSON {type(v).__name__}")
        return v
    return _type("JSON object", conv)


def checked(conv: Callable[[str], Any], *errors: type[Exception]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises one of ``errors`` saying what it
    accepts (e.g. kvtier.config's ConfigError); the argument's name is argparse's."""
    def wrapped(text: str) -> Any:
        try:
            return conv(text)
        except errors as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    wrapped.__name__ = getattr(conv, "__name__", "value")
    return wrapped
