"""The README's commands cannot drift: every `python X.py [subcommand]` and torchrun line in its code blocks (and in
inline code that starts with one) names a script that exists, and every --flag it uses there is one that script's
--help lists. The helps run in this
process (runpy, sys.argv patched), so the scripts' shared imports (torch) load once, not once per command."""
import contextlib
import io
import re
import runpy
import shlex
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_COMMAND = re.compile(r"`((?:python3?|torchrun) [^`]+)`")
FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")
COMMENT = re.compile(r"(^|\s)#.*")


def readme_commands(text: str) -> list[tuple[str, str | None, list[str]]]:
    """(script, subcommand or None, the arguments after it) of each python/torchrun command in the code blocks and
    in inline code that starts with one."""
    commands = []
    inline = [span.replace("\n", " ") for span in INLINE_COMMAND.findall(CODE_BLOCK.sub("", text))]
    for block in CODE_BLOCK.findall(text) + inline:
        for line in block.replace("\\\n", " ").splitlines():
            for segment in re.split(r"&&|\|\||;|\|", COMMENT.sub("", line)):
                command = script_command(shlex.split(segment.replace("[", " ").replace("]", " ")))
                if command:
                    commands.append(command)
    return commands


def script_command(tokens: list[str]) -> tuple[str, str | None, list[str]] | None:
    """The script, subcommand and arguments of one shell command, or None where it runs no script of this repo."""
    for i, token in enumerate(tokens):
        launcher = token == "torchrun" or Path(token).name in ("python", "python3")
        if not launcher:
            continue
        rest = tokens[i + 1:]
        scripts = [j for j, arg in enumerate(rest) if arg.endswith(".py")]
        if not scripts or (token != "torchrun" and scripts[0] != 0):
            return None  # `python -m pytest`, `python3 -m venv`: not a script here
        args = rest[scripts[0] + 1:]
        subcommand = args[0] if args and not args[0].startswith("-") else None
        return rest[scripts[0]], subcommand, args
    return None


@contextlib.contextmanager
def command_line(argv: list[str]):
    """sys.argv set to argv; sys.argv and the Ctrl-C/SIGTERM handlers (the trainers' main sets its own) restored."""
    saved_argv, saved_handlers = sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved_argv
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)


def help_text(script: str, subcommand: str | None) -> str:
    """What `python script [subcommand] --help` prints, run in this process; fails unless it exits with 0."""
    argv = [script] + ([subcommand] if subcommand else []) + ["--help"]
    out, err = io.StringIO(), io.StringIO()
    with command_line(argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_.value.code in (0, None), f"`python {' '.join(argv)}` exited with {exit_.value.code}: {err.getvalue()}"
    return out.getvalue()


def usage_flags(help_output: str) -> set[str]:
    """The flags the usage block (everything up to the first blank line) lists, not those the prose mentions."""
    usage = help_output.split("\n\n", 1)[0]
    assert usage.startswith("usage:"), help_output[:200]
    return set(FLAG.findall(usage))


def readme_flags_by_command() -> dict[tuple[str, str | None], set[str]]:
    flags: dict[tuple[str, str | None], set[str]] = {}
    for script, subcommand, args in readme_commands(README.read_text()):
        flags.setdefault((script, subcommand), set()).update(FLAG.findall(" ".join(args)))
    return flags


README_COMMANDS = readme_flags_by_command()


def test_the_readme_shows_commands():
    assert ("train.py", None) in README_COMMANDS and ("predict.py", None) in README_COMMANDS


def test_parsing_a_readme_line():
    line = "```bash\nOMP_NUM_THREADS=1 python compress.py rd --split test \\\n    --out rd/  # it's no --flag\n```\n"
    assert readme_commands(line) == [("compress.py", "rd", ["rd", "--split", "test", "--out", "rd/"])]
    torchrun = "```\ntorchrun --standalone --nproc_per_node=4 train.py --dataset OASIS [--epochs 3]\n```\n"
    assert readme_commands(torchrun) == [("train.py", None, ["--dataset", "OASIS", "--epochs", "3"])]
    assert readme_commands("```\npython -m pytest -q && python3 -m venv .venv\n```\n") == []
    assert readme_commands("a denoiser:\n`python train.py --train-noise rician:0.1`.") == [
        ("train.py", None, ["--train-noise", "rician:0.1"])]


@pytest.mark.xdist_group("readme")  # one worker runs every help, so the scripts' imports load once
@pytest.mark.parametrize("script,subcommand", sorted(README_COMMANDS, key=str), ids=lambda v: v or "")
def test_readme_command_flags_exist(script, subcommand):
    assert (ROOT / script).is_file(), f"README.md runs {script}, which is not in the repository"
    missing = README_COMMANDS[script, subcommand] - usage_flags(help_text(script, subcommand))
    command = " ".join(filter(None, ("python", script, subcommand)))
    assert not missing, f"README.md gives `{command}` flags its --help does not list: {sorted(missing)}"


def test_readme_results_figures_are_in_results_md():
    """Every number in the README's results table is one RESULTS.md states (with its command and machine)."""
    text = README.read_text()
    table = text.split("## Where it stands now", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows, "README.md has no results table under 'Where it stands now'"
    results = (ROOT / "RESULTS.md").read_text()
    figures = {n for row in rows for n in re.findall(r"\d+(?:\.\d+)?", row)}
    missing = sorted(n for n in figures if not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d]|\.\d)", results))
    assert not missing, f"README.md's results table gives figures RESULTS.md does not: {missing}"
