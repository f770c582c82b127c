"""What every command shares: library errors shown as ``Error: ...`` with flag names, ``--json``
output, progress bars and small option parsers."""

from __future__ import annotations

import functools
import json
import re
import sys

import click

from ..errors import FeatcacheError


class LibraryError(click.ClickException):
    """A :class:`FeatcacheError` on its way to the user; ``kind`` is the library's class name."""

    def __init__(self, error: FeatcacheError) -> None:
        super().__init__(flag_names(str(error)))
        self.kind = type(error).__name__


def flag_names(message: str) -> str:
    """Library errors name parameters as Python spells them (the 'freeze_until' option,
    freeze_until=LAYER); on the command line the user typed flags: name those (--freeze-until)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return message
    flags = {p.name: next(o for o in p.opts if o.startswith("--")) for p in ctx.command.params
             if isinstance(p, click.Option) and p.name and any(o.startswith("--") for o in p.opts)}
    quoted = r"'(\w+)'"

    def options(m: re.Match) -> str:  # "the 'a' option", "the 'a' and 'b' options"
        return re.sub(quoted, lambda q: flags.get(q.group(1), q.group(0)), m.group(0))

    message = re.sub(rf"{quoted}( and {quoted})? options?\b", options, message)
    switches = {p.name for p in ctx.command.params if isinstance(p, click.Option) and p.is_flag}
    message = re.sub(r"\b(\w+)=True\b", lambda m: flags[m.group(1)] if m.group(1) in switches else m.group(0), message)
    return re.sub(r"\b(\w+)=(?=\S)", lambda m: flags[m.group(1)] + " " if m.group(1) in flags else m.group(0),
                  message)


class Interrupted(click.ClickException):
    """Ctrl-C: one ``Error:`` line saying what was kept (and one JSON object with ``--json``), as
    an interrupted extraction reports it, instead of click's bare "Aborted!"."""

    kind = "Interrupted"


def fail_cleanly(fn=None, *, interrupted: str = "Stopped (Ctrl-C) before the command finished."):
    """Turn library errors into ``Error: ...`` (exit 1, no traceback), and Ctrl-C into
    ``Error: <interrupted>``; ``interrupted`` says what the command keeps when stopped."""
    if fn is None:
        return lambda f: fail_cleanly(f, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as e:
            raise LibraryError(e) from None
        except KeyboardInterrupt:
            raise Interrupted(interrupted) from None

    return wrapper


class Group(click.Group):
    """With ``--json``, a failing command also prints ``{"error": ..., "type": ...}`` on stdout
    (the ``Error:`` line still goes to stderr) and exits 1, usage errors included."""

    def make_context(self, info_name, args, parent=None, **extra):
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["featcache.json"] = "--json" in args
        return ctx

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            cmd = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            if ctx.meta.get("featcache.json") and cmd and any(p.name == "as_json" for p in cmd.params):
                echo_json({"error": e.format_message(), "type": getattr(e, "kind", type(e).__name__)})
                e.exit_code = 1
            raise


def floats(value: str | None, name: str, n: int = 3):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"needs {n} comma-separated numbers, e.g. 0.5,0.5,0.5. Got {value!r}.",
                                 param_hint=name) from None
    if len(out) != n:
        raise click.BadParameter(f"needs {n} comma-separated numbers. Got {value!r}.", param_hint=name)
    return out


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=None, default=str))


def explicit_options(ctx: click.Context, names) -> set[str]:
    """Options the user typed (not defaults)."""
    from click.core import ParameterSource

    return {n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}


class Progress:
    """A tqdm bar with images/s and ETA, created on the first call."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:  # finished: close now so later output is not interleaved with the bar
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_metrics(metrics: dict, fmt) -> None:
    # Scalars, their intervals ([low, high]) and the bootstrap's settings; not the tables.
    slim = {s: {k: v for k, v in m.items() if not isinstance(v, (list, dict)) or k.endswith("_ci") or k == "ci"}
            for s, m in metrics.items()}
    if slim:
        click.echo(fmt(slim))


def csv_values(value: str | None, cast=str):
    if value is None:
        return None
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expects comma-separated values, got {value!r}.") from None
