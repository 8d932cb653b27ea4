"""Metadata filters written as text (`umr search --filter year=2020`), typed as JSON would be.

Metadata keeps JSON types and a filter matches by equality of type and value, so the text
`2020` must become the number 2020 to find {"year": 2020}. Numbers and true/false are typed;
quotes keep a string (`name="2020"`); anything else is a string as written. The search page
parses its filter field by the same rules.
"""
from __future__ import annotations

import json
import re

from umr.index.errors import InvalidArgument

NUMBER = re.compile(r"^-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?$")


def parse_value(text: str) -> str | int | float | bool:
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    if value in ("true", "false"):
        return value == "true"
    if NUMBER.match(value):
        number = json.loads(value)
        if isinstance(number, float) and not (number == number and abs(number) != float("inf")):
            raise InvalidArgument(f"filter value {text!r} is not a finite number")
        return number
    return value


def parse_filter(pairs: list[str] | None) -> dict[str, str | int | float | bool] | None:
    """['year=2020', 'draft=false', 'name="2020"'] -> {"year": 2020, "draft": False, "name": "2020"}."""
    out: dict[str, str | int | float | bool] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"--filter takes KEY=VALUE (year=2020, draft=true, name=\"2020\" for a string), got {pair!r}")
        out[key.strip()] = parse_value(value)
    return out or None
