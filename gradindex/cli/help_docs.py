"""The command reference, docs/cli.md, generated from the click commands themselves.

In: the ``gradindex`` click group (:data:`gradindex.cli.main`) and every command below it.
Out: one Markdown string — a header saying how to regenerate it, a table of contents, then each
command's ``--help`` text in a fenced block, commands in the order ``gradindex``, then its
subcommands by name, depth first. The text is rendered at a fixed width (:data:`WIDTH`) so it does not
depend on the terminal it is generated in. ``tools/gen_cli_docs.py`` writes it; ``tests/test_docs.py``
fails when the file differs from what this returns.
"""

from __future__ import annotations

from collections.abc import Iterator

import click

WIDTH = 100
REGENERATE = "python3 tools/gen_cli_docs.py"


def iter_commands(command: click.Command, parent: click.Context | None = None,
                  name: str = "gradindex") -> Iterator[click.Context]:
    """Yield a context for ``command`` and then, depth first and sorted by name, for each subcommand."""
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=WIDTH,
                        max_content_width=WIDTH, help_option_names=["-h", "--help"])
    yield ctx
    if isinstance(command, click.Group):
        for sub_name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                yield from iter_commands(sub, ctx, sub_name)


def render_markdown(group: click.Command | None = None) -> str:
    """docs/cli.md's text: every command's ``--help`` as Markdown (``group``: default ``gradindex.cli.main``)."""
    if group is None:
        from gradindex.cli import main as group
    contexts = list(iter_commands(group))
    lines = [
        "# Command reference",
        "",
        "<!-- GENERATED from the click commands by `" + REGENERATE + "`; do not edit by hand. -->",
        "",
        f"Generated from the commands' own `--help` (width {WIDTH}). After changing a command or a flag, run "
        f"`{REGENERATE}` from the repository root; `tests/test_docs.py` fails while this file is out of date.",
        "",
    ]
    lines += [f"* [`{ctx.command_path}`](#{_anchor(ctx.command_path)})" for ctx in contexts]
    for ctx in contexts:
        text = ctx.command.get_help(ctx).rstrip()
        lines += ["", f"## {ctx.command_path}", "", "```text", *(line.rstrip() for line in text.splitlines()), "```"]
    return "\n".join(lines) + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor for a command path (``gradindex build-index`` → ``gradindex-build-index``)."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")
