"""`PROG completion bash|zsh|fish`: the shell completion script for a click command.

click already answers completion requests when `_PROG_COMPLETE` is set; what users lack is
a way to get the script without knowing that variable's name, so each of the three
commands gets the same `completion` sub-command (`eval "$(meshmgmt completion bash)"`, or
write it to the shell's completion directory)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")


def complete_var(prog: str) -> str:
    """The variable click's generated script sets when it calls the program back."""
    return f"_{prog.replace('-', '_').upper()}_COMPLETE"


def completion_command(prog: str) -> click.Command:
    @click.command("completion")
    @click.argument("shell", type=click.Choice(SHELLS))
    @click.pass_context
    def completion(ctx: click.Context, shell: str) -> None:
        """Print the completion script for SHELL.

        bash: eval "$(PROG completion bash)" in ~/.bashrc; zsh: the same in ~/.zshrc;
        fish: PROG completion fish > ~/.config/fish/completions/PROG.fish"""
        cls = get_completion_class(shell)
        assert cls is not None   # SHELLS are click's own
        root = ctx.find_root().command
        click.echo(cls(root, {}, prog, complete_var(prog)).source())

    assert completion.help is not None
    completion.help = completion.help.replace("PROG", prog)
    return completion
