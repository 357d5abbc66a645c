"""The typer app every command group is made of (`cxrbatch`, its `db`, `jobs`, `bundle`
groups and `cxrbatch training`): plain-text help, `-h`, no completion, and each command
wrapped by the group's `guard`, which turns the errors an operator can cause into one line
and an exit status (cxrbatch/cli.py `_operator_errors`, cxrbatch_training/cli.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

Guard = Callable[[Callable[..., Any]], Callable[..., Any]]


class GuardedApp(typer.Typer):
    def __init__(self, guard: Guard, **settings: Any) -> None:
        settings.setdefault("no_args_is_help", True)
        settings.setdefault("add_completion", False)
        settings.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        # Help texts are plain text: "[dicom]" or "[[send.destinations]]" print as written.
        settings.setdefault("rich_markup_mode", None)
        super().__init__(**settings)
        self.guard = guard

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        register = super().command(*args, **kwargs)
        return lambda function: register(self.guard(function))
