"""Plain placeholders in `--help`: ``MODEL INPUTS...`` and ``INTEGER``/``TEXT``/``PATH``,
no ``{model}`` / ``<bool>`` / ``<list[str]>`` (what recent typer versions print).

Importing this module adjusts typer's help rendering once; on typer versions that
render click-style placeholders already, it changes nothing.
"""
from __future__ import annotations

import re

_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "Path": "PATH",
          "file": "FILE", "directory": "DIRECTORY", "datetime": "DATETIME", "uuid": "UUID"}


def plain_type(label):
    """``<int>`` -> ``INTEGER``, ``<list[str]>`` -> ``TEXT``, ``<bool>`` -> None (a flag)."""
    if label is None:
        return None
    text = str(label)
    m = re.fullmatch(r"<(.*)>(\.\.\.)?", text)
    if not m:
        return text
    inner = m.group(1)
    lst = re.fullmatch(r"list\[(.*)\]", inner)
    if lst:
        inner = lst.group(1)
    if inner == "bool":
        return None
    return "|".join(_NAMES.get(part, part.upper()) for part in inner.split("|"))


def _install() -> None:
    try:
        from typer import core
    except ImportError:  # pragma: no cover
        return
    option, argument = getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)
    if option is not None and hasattr(option, "display_type_rich"):
        original_option = option.display_type_rich

        def option_type(self, ctx):
            if getattr(self, "is_flag", False):
                return None
            return plain_type(original_option(self, ctx))

        option.display_type_rich = option_type
    if argument is not None and hasattr(argument, "display_type_rich"):
        original_argument = argument.display_type_rich
        argument.display_type_rich = lambda self, ctx: plain_type(original_argument(self, ctx))
    if argument is not None and hasattr(argument, "_usage_display_name"):
        def usage_name(self):
            name = (self.metavar or self.name or "").upper()
            if self.nargs != 1:
                name += "..."
            return name if self.required else f"[{name}]"

        argument._usage_display_name = usage_name
    if argument is not None and hasattr(argument, "_rich_display_name"):
        def rich_name(self):
            name = (self.metavar or self.name or "").upper()
            return name + ("..." if self.metavar is None and self.nargs != 1 else "")

        argument._rich_display_name = rich_name


_install()
