"""`opt`: a config field with its help text, the one place help is written."""

from __future__ import annotations

from dataclasses import field


def opt(default, help: str, **kw):
    """A config field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})
