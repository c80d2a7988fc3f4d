"""Config dataclasses <-> command lines: one flag per field (its help the field's comment), the flags given split
into the run's and the model's config, a value a config refuses turned into its flag's one-line error, and a config
written back as the flags that set it (how ablate.py, ladder.py and bench.py start train.py)."""
import argparse
import functools
import inspect
import re
from dataclasses import fields

from modules import ConfigError
from utils import ArgumentParser, UserError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def command_flags(values: dict) -> list[str]:
    """{config field: value} -> the flags that set them, as a command line takes them (None left out, booleans as
    --field / --no-field): how ablate.py and bench.py start train.py."""
    flags = []
    for name, value in values.items():
        if isinstance(value, bool):
            flags.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif value is not None:
            flags += [flag(name), str(value)]
    return flags


@functools.cache
def field_help(cls) -> dict[str, str]:
    """{field: the comment after it} from the dataclass's source: the one place each setting is explained."""
    comments = re.findall(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$", inspect.getsource(cls), re.MULTILINE)
    return dict(comments)


def add_config_flags(group, cls, show_defaults: bool = True, exclude=()):
    """One flag per field of the dataclass `cls` (--field-name; booleans also get --no-field-name), its help the
    field's comment. Used with argument_default=SUPPRESS, so only the flags given come back from parse_args."""
    helps, choices = field_help(cls), getattr(cls, "CHOICES", {})
    for f in fields(cls):
        if f.name in exclude:
            continue
        kind = next(t for t in (bool, int, float, str) if t is f.type or t in getattr(f.type, "__args__", ()))
        text = helps[f.name] + (f" (default: {f.default})" if show_defaults and f.default is not None else "")
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(flag(f.name), type=kind, choices=choices.get(f.name),
                               metavar=f.name.upper() if f.name not in choices else None, help=text)


def parse_config_flags(argv, prog: str, doc: str, run_cls, model_cls, model_title: str,
                       exclude=()) -> tuple[dict, dict]:
    """The flags given explicitly, split into `run_cls` and `model_cls` fields."""
    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    add_config_flags(p.add_argument_group(f"training ({run_cls.__name__})"), run_cls)
    add_config_flags(p.add_argument_group(model_title), model_cls, show_defaults=False, exclude=exclude)
    args = vars(p.parse_args(argv))
    run_names = {f.name for f in fields(run_cls)}
    return {k: v for k, v in args.items() if k in run_names}, {k: v for k, v in args.items() if k not in run_names}


def config_or_error(cls, **values):
    """cls(**values), a value its __post_init__ refuses turned into the one-line UserError of its flag."""
    try:
        return cls(**values)
    except ConfigError as e:
        raise UserError(f"invalid {flag(e.field)} {e.value!r}; see --help for what it takes") from None


def split_subcommand(argv: list[str], script: str, commands: dict[str, str], example: str) -> tuple[str, list[str]]:
    """(subcommand, its flags) of a command line that starts with one of `commands` ({name: what it does}), for
    the scripts whose subcommands parse their own flags (segment.py, hyperprior.py). -h/--help alone lists the
    subcommands and exits 0; no subcommand, or an unknown one, is a UserError naming them."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: python {script} {{{','.join(commands)}}} ...\n")
        for name, what in commands.items():
            print(f"  {name:8}{what}")
        print(f"\nsee python {script} COMMAND --help for the flags of each")
        raise SystemExit(0)
    if not argv or argv[0] not in commands:
        raise UserError(f"{script} needs a command first: {' or '.join(commands)} (e.g. python {script} {example}); "
                        f"see python {script} {next(iter(commands))} --help")
    return argv[0], argv[1:]
