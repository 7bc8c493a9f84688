"""What every `bsqc` command shares: the consoles and the one-line error handling."""

from __future__ import annotations

import functools
import os
import sys

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperOption

from ..errors import BsqError

out_console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class _Command(TyperCommand):
    """A command whose help names values as argparse does (`--out-dir OUT_DIR`, `IMAGE...`), instead of
    typer's type placeholders (`--out-dir <path>`, `IMAGE... <list[Path]>`, `{IMAGE...}...`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            if isinstance(p, TyperArgument):
                name = p.metavar or p.name.upper() + ("..." if p.nargs != 1 else "")
                p.metavar = name
                p.display_type_rich = lambda ctx: None
                shown = name if p.required else f"[{name}]"
                p._usage_display_name = lambda shown=shown: shown  # the usage line (typer 0.29)
                p.get_usage_pieces = lambda ctx, shown=shown: [shown]  # the usage line (typer before 0.29)
            elif isinstance(p, TyperOption) and p.metavar is None and not p.is_flag and not p.count:
                p.metavar = p.name.upper()


class _Typer(typer.Typer):
    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


def new_app(help: str) -> typer.Typer:
    # rich_markup_mode=None: plain help text (no "[default: ...]" eaten as markup, no <bool> placeholders)
    return _Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


def error_line(e: BaseException) -> str:
    """The one line a failure is reported as (without the 'bsqc: error:' prefix)."""
    if isinstance(e, BsqError):
        return str(e)
    if isinstance(e, MemoryError):
        return "out of memory"
    return f"internal error: {type(e).__name__}: {e}"


def fail(msg: str) -> None:
    err_console.print(f"bsqc: error: {msg}", markup=False)
    raise typer.Exit(1)


def guarded(fn):
    """Turn every BsqError (and anything unexpected) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("bsqc: interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as e:  # a bug, not the user's fault: still one line, unless debugging
            if not isinstance(e, (BsqError, MemoryError)) and os.environ.get("BSQC_DEBUG"):
                raise
            fail(error_line(e))

    return wrapper
