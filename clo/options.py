"""Options declared once. A config dataclass field carries its default, its help and its
choices; the command-line flags, the YAML loading and the choice checks are derived from it:

    method: str = option("clo", "clo, sft or dpo", choices=("clo", "sft", "dpo"))

is the flag ``--method {clo,sft,dpo}`` with that help and default, and ``check_choices``
refuses any other value by name (nanochat's name-default-help-on-one-line, in dataclass form).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from .errors import UserError


def option(default, help: str = "", *, choices: tuple | None = None, required: bool = False,
           positional: bool = False):
    """A dataclass field: ``default``, the flag's ``help`` and, for a closed set, its ``choices``.
    ``required``: the command refuses to run without the flag (the default is then None);
    ``positional``: one or more words after the command instead of a flag (a list)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "required": required,
                                                        "positional": positional})


# Options several commands share, each declared here once (a function: a dataclass field object
# belongs to one class).
RUN_DIR = "runs/clo"  # the training run `clo train` writes and `clo eval` / `clo generate` read
MAX_LENGTH = 256  # tokens per sequence: what training sees, and the held-out NLL scores


def target_lang_option():
    from .data import DEMO_LANG  # the bundled demo's language is the default target

    return option(DEMO_LANG, "target language, ISO 639-1 code")


def on_bad_row_option():
    from .data import BAD_ROW_POLICIES

    return option("skip", "skip (drop, count and log bad rows) or error (stop at the first, naming it)",
                  choices=BAD_ROW_POLICIES)


def device_option():
    """--device of the commands that load a model on one device (clo train has its own: torchrun)."""
    return option("auto", "auto, cpu, cuda or cuda:N")


def check_target_lang(code: str, flag: str = "target_lang") -> None:
    from .translate import LANGUAGES

    if code not in LANGUAGES:
        raise UserError(f"{flag} {code!r} is not a supported ISO 639-1 code; supported: {', '.join(sorted(LANGUAGES))}")


def check_choices(cfg) -> None:
    """Every field declared with choices holds one of them (a UserError naming it otherwise)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise UserError(f"{f.name} must be one of {'|'.join(choices)}, got {value!r}")


def _scalar_type(cls, f: dataclasses.Field):
    """The scalar type of a plain or Optional field (annotations are strings here)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_args(parser: argparse.ArgumentParser, cls, *, only: tuple[str, ...] | None = None,
             help_prefix: str = "") -> None:
    """One flag per field of ``cls`` (or of the fields in ``only``): ``max_steps`` ->
    ``--max-steps``. The argparse default is SUPPRESS, so that only the flags given override a
    YAML file and the dataclass defaults stay the one source of defaults."""
    unknown = set(only or ()) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", help=f"{help_prefix}{f.metadata.get('help', '')}")
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(cls, f)
        choices = f.metadata.get("choices")
        required = f.metadata.get("required", False)
        shown = "" if required else f" [default: {f.default}]"
        extra = {"help": f"{help_prefix}{f.metadata.get('help', '')}{shown}", "default": argparse.SUPPRESS,
                 "required": required}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **extra)
        else:
            parser.add_argument(flag, type=kind, choices=choices, metavar=None if choices else f.name.upper(),
                                **extra)


def from_args(cls, args: argparse.Namespace, *, config: str | None = None):
    """``cls`` from a YAML file of options (``config``), overridden by the flags given in ``args``."""
    values = _load_yaml(cls, config) if config else {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _load_yaml(cls, path: str) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise UserError(f"--config {path}: cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a mapping of options, got {type(loaded).__name__}")
    values = {k.replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {unknown}")
    return values
