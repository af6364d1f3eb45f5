"""Render docs/cli.md, the `augment` command-line reference, from `AugmentConfig` and the CLI itself.

    python docs/make_cli_reference.py           # rewrite docs/cli.md
    python docs/make_cli_reference.py --check   # exit 1 if docs/cli.md is not what this renders

The settings come from `AugmentConfig`'s fields through the CLI's own option helpers (`flag`, `metavar`,
`flag_fields`, ... of the module that generates the flags), grouped by the comment lines of the class; the
commands' other options (`--config`, `--dry-run`, the sub-commands' options) come from the typer app's help
records, so the page says what `augment --help` says. `tests/test_cli_reference.py` fails when the page
drifts from this rendering.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "docs" / "cli.md"

#: Where the module that turns config fields into flags lives (it moved into a sub-package; either works).
OPTIONS_MODULES = ("pipeline.cli.options", "pipeline.cli_options")
#: The module that assembles the whole `augment` app (`make_app`), `flow` included.
APP_MODULES = ("flows.cli",)


def _first_module(names: tuple[str, ...]) -> ModuleType:
    """The first of `names` that imports from this checkout. An editable install of another checkout can still
    answer an old module path (its finder serves names this checkout no longer has): that module is used only
    when no candidate is found here."""
    errors, elsewhere = [], None
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):  # a missing dependency, not a moved module
                raise
            errors.append(f"{name}: {exc}")
            continue
        if Path(module.__file__ or "").resolve().is_relative_to(REPO):
            return module
        elsewhere = elsewhere or module
    if elsewhere is not None:
        return elsewhere
    raise ModuleNotFoundError("none of " + ", ".join(names) + " imports: " + "; ".join(errors))


def options_module() -> ModuleType:
    """The CLI's option generator (`flag`, `flag_fields`, `metavar`, ...), wherever it lives now."""
    return _first_module(OPTIONS_MODULES)


def augment_command() -> Any:
    """The `augment` app as a click group (sub-commands included)."""
    import typer

    module = _first_module(APP_MODULES)
    app = module.make_app() if hasattr(module, "make_app") else module.app
    return typer.main.get_command(app)


# -- Markdown helpers -------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped everywhere (also in code spans, as GFM tables need), `<` outside
    code spans as an entity (not an HTML tag), newlines as spaces."""
    parts = " ".join(text.split()).split("`")
    for i, part in enumerate(parts):
        part = part.replace("|", "\\|")
        parts[i] = part if i % 2 else part.replace("<", "&lt;")
    return "`".join(parts)


def _code(text: str) -> str:
    return _cell(f"`{text}`")


def _sentence(text: str) -> str:
    return " ".join(text.split())


# -- the settings (config fields) -------------------------------------------------------------------------


def _groups(config_class: type, names: list[str]) -> list[tuple[str, list[str]]]:
    """The flag fields grouped by the `# comment` line above them in the class body, in declaration order."""
    source = inspect.getsource(config_class)
    group_of: dict[str, str] = {}
    group = "Settings"
    for line in source.splitlines():
        comment = re.match(r"^    # (?!-)(.+)$", line)
        if comment:
            group = comment.group(1).strip()
            continue
        field = re.match(r"^    (\w+)\s*:", line)
        if field and field.group(1) in names and field.group(1) not in group_of:
            group_of[field.group(1)] = group
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        title = group_of.get(name, "Settings")
        if not groups or groups[-1][0] != title:
            groups.append((title, []))
        groups[-1][1].append(name)
    return groups


def _setting_row(opts: ModuleType, name: str, field: Any, runtime: frozenset[str]) -> str:
    flag = opts.flag(name)
    if opts.is_switch(field):
        shown, value = f"{flag} / --no-{flag[2:]}", "switch"
    else:
        shown, value = flag, _code(opts.metavar(field))
    default = "required (unless in `--config`)" if field.is_required() else _code(opts._shown_default(field))
    hashed = "no (runtime)" if name in runtime else "yes"
    return f"| {_code(shown)} | {value} | {default} | {hashed} | {_cell(field.description or '')} |"


def render_settings(opts: ModuleType) -> list[str]:
    config_class = opts.AugmentConfig
    config_module = sys.modules[config_class.__module__]
    runtime = frozenset(getattr(config_module, "RUNTIME_FIELDS", frozenset()))
    fields = opts.flag_fields()
    lines: list[str] = []
    for title, names in _groups(config_class, list(fields)):
        lines += [f"### {title[:1].upper() + title[1:]}", ""]
        lines += ["| flag | value | default | in the config hash | description |", "|---|---|---|---|---|"]
        lines += [_setting_row(opts, name, fields[name], runtime) for name in names]
        lines.append("")
    return lines


# -- the commands' own options (from the app's help records) ---------------------------------------------


def _context(command: Any, name: str, parent: Any = None) -> Any:
    import click

    return click.Context(command, info_name=name, parent=parent)


def _help_rows(params: list[Any], ctx: Any) -> list[str]:
    rows = []
    for param in params:
        record = param.get_help_record(ctx)
        if record is not None:
            rows.append(f"| {_code(record[0])} | {_cell(record[1])} |")
    return rows


def _options_table(params: list[Any], ctx: Any, head: str = "option") -> list[str]:
    rows = _help_rows(params, ctx)
    return [f"| {head} | description |", "|---|---|", *rows, ""] if rows else []


def _usage(command: Any, ctx: Any, path: str) -> str:
    return " ".join([path, *command.collect_usage_pieces(ctx)])


def _options(command: Any, ctx: Any) -> list[Any]:
    help_option = command.get_help_option(ctx)
    return [p for p in command.params if p.param_type_name == "option"] + ([help_option] if help_option else [])


def _arguments(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "argument"]


def render_root(root: Any, ctx: Any, settings: set[str]) -> list[str]:
    own = [p for p in _options(root, ctx) if p.name not in settings]
    lines = ["## `augment`", "", f"    {_usage(root, ctx, 'augment')}", ""]
    lines += [_sentence(root.help.split("\n\n")[0]) + " Run (or resume) the job:", ""]
    lines += [f"    {line.strip()}" for line in root.help.split("\n\n", 1)[1:]] + [""]
    lines += ["Besides the settings (below), `augment` takes:", ""]
    lines += _options_table(own, ctx)
    epilog = (root.epilog or "").replace("\b", "").strip("\n")
    if epilog:
        title, _, body = epilog.partition("\n")
        lines += [f"### {title.rstrip(':')}", "", "```", *body.splitlines(), "```", ""]
    return lines


def render_subcommands(root: Any, ctx: Any, settings: set[str]) -> list[str]:
    root_names = {p.name for p in root.params}
    lines: list[str] = []
    for name in sorted(root.commands, key=lambda n: (n != "flow", n)):
        command = root.commands[name]
        sub = _context(command, name, ctx)
        lines += [f"## `augment {name}`", "", f"    {_usage(command, sub, 'augment ' + name)}", ""]
        lines += [_sentence(command.help or ""), ""]
        options = _options(command, sub)
        names = {p.name for p in options}
        if settings <= names:  # a job command (`augment flow`): the settings, then its own options
            missing = [f"`{p.opts[0]}`" for p in _options(root, ctx) if p.name not in names]
            lines += [
                "It takes every option of `augment` (the settings above and `--config`)"
                + (f" but {', '.join(missing)}" if missing else "")
                + "; options given before the sub-command count as well. Its own:",
                "",
            ]
            options = [p for p in options if p.name not in root_names]
        if _arguments(command):
            lines += _options_table(_arguments(command), sub, head="argument")
        lines += _options_table(options, sub)
    return lines


def render() -> str:
    """The whole of docs/cli.md."""
    opts = options_module()
    root = augment_command()
    ctx = _context(root, "augment")
    settings = set(opts.flag_fields())
    lines = [
        "# `augment` command-line reference",
        "",
        "<!-- Generated by `python docs/make_cli_reference.py` from `AugmentConfig` and the CLI's option",
        "declarations: do not edit by hand; tests/test_cli_reference.py fails when this page drifts. -->",
        "",
        "Every setting of a run is a field of `AugmentConfig` and a flag of `augment` and `augment flow`: `--` and "
        "the field name with `_` written `-`, its description as help, its default shown, its choices (a "
        "`Literal`) as the value. A `--config job.json` (or `.toml`) holds the same settings by field name; flags "
        "override it. Lists are comma-separated (`--bandwidth-factors 0.5,1,2`); a setting that may be None takes "
        "`none` (`--lookahead-steps none`); an on/off setting is a pair of switches (`--force / --no-force`). An "
        "invalid value is one line naming the flag, exit code 2, nothing written. Settings marked *runtime* are "
        "not in the config hash, so a re-run may change them and still resume the same run.",
        "",
        "The exit codes and what each run writes are in the [README](../README.md); how each setting acts is in "
        "[How a run works](how-a-run-works.md).",
        "",
    ]
    lines += render_root(root, ctx, settings)
    lines += ["## Settings", ""]
    lines += render_settings(opts)
    lines += render_subcommands(root, ctx, settings)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs from the rendering")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(REPO)} is stale: run `python docs/make_cli_reference.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)} ({len(text):,} characters)")
    return 0


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.exit(main())
