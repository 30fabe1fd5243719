"""Method settings declared once: each field of a method's settings dataclass carries its help, the paper's
default (the field's default) and whether a model config may override it. From these alone come the
command-line flags (``add_setting_args``), the one resolution order every method uses (``resolve``:
flag > the model config's per-method block > the paper's default) and ``--show_settings``.

    @dataclass
    class MySettings(MethodSettings):
        lr: float = setting(1e-5, "Adam's learning rate")
        prompt: str = setting(None, "the concept to erase", required=True, config=False)
"""
import argparse
from dataclasses import asdict, dataclass, field, fields

from ldm.util import UsageError


def setting(default, help, *, config=True, flag=True, type=None, choices=None, const=None, metavar=None,
            required=False, aliases=(), variant=False):
    """A settings field: ``default`` is the paper's (or, where the paper has none, the public code's);
    ``config``: a model config's per-method block may set it; ``flag``: it is a command-line flag;
    ``variant``: fixed by the registry entry that names a variant of a method (ESD's train method);
    ``const``: the value of the bare flag (``nargs='?'``); ``aliases``: other spellings of the flag."""
    return field(default=default, metadata={"help": help, "config": config, "flag": flag, "type": type,
                                            "choices": choices, "const": const, "metavar": metavar,
                                            "required": required, "aliases": tuple(aliases), "variant": variant})


@dataclass
class MethodSettings:
    """Base of every method's settings: ``as_dict``, ``check`` (one line per bad value) and
    ``adjust_defaults`` (a method's defaults that follow the user's own choices)."""

    def as_dict(self):
        return asdict(self)

    def check(self):
        """Refuse bad values with one line each; returns self."""
        return self.check_choices()

    def check_choices(self):
        """A setting declared with ``choices`` holds one of them (a model config's value too); one line if not."""
        for f in setting_fields(type(self)):
            allowed, value = f.metadata["choices"], getattr(self, f.name)
            if allowed and value not in allowed:
                raise UsageError(f"--{f.name} must be one of {', '.join(map(str, allowed))}, got '{value}'")
        return self

    def concepts(self):
        """The concepts a run of these settings erases (methods that split ``prompt`` say how)."""
        return [self.prompt]

    @classmethod
    def adjust_defaults(cls, values, sources):
        """Change, in place, ``values`` whose ``sources`` are defaults, given the rest (none by default)."""


def setting_fields(cls):
    """The fields of a settings class that are settings (declared with ``setting``)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def _flag_type(f):
    if f.metadata["type"] is not None:
        return f.metadata["type"]
    if f.default is None or isinstance(f.default, str):
        return str
    return type(f.default)


def _shown(value):
    return "none" if value is None else '""' if value == "" else value


def add_setting_args(parser, cls, fixed=(), model_defaults=None):
    """One flag per settings field of ``cls`` (``fixed`` ones, set by a variant, left out), each help ending
    in its paper default and, when the default model config overrides it, that value too. Flags not given
    are absent from the parsed namespace (``argparse.SUPPRESS``), so ``resolve`` knows what the user set."""
    model_defaults = model_defaults or {}
    for f in setting_fields(cls):
        m = f.metadata
        if not m["flag"] or f.name in fixed:
            continue
        default = "required" if m["required"] else f"paper: {_shown(f.default)}"
        if f.name in model_defaults and m["config"]:
            default += f"; default model: {_shown(model_defaults[f.name])}"
        kwargs = {"help": f"{m['help']} ({default})", "default": argparse.SUPPRESS, "metavar": m["metavar"]}
        if m["const"] is not None:
            kwargs.update(nargs="?", const=m["const"])
        if m["choices"]:
            kwargs["choices"] = m["choices"]
        if m["required"]:
            kwargs["required"] = True
        parser.add_argument(f"--{f.name}", *[f"--{a}" for a in m["aliases"]], dest=f.name, type=_flag_type(f), **kwargs)
    return parser


def model_config_defaults(cls, model_config, blocks):
    """``{field: (value, block)}`` from a model config's per-method blocks (later blocks more specific). A key
    that is no setting of ``cls``, or one a model config may not set, is one line."""
    known = {f.name: f for f in setting_fields(cls)}
    found = {}
    for block in blocks:
        for key, value in (model_config.get(block) or {}).items():
            if key not in known:
                raise UsageError(f"the model config's {block}: '{key}' is no setting of this method; its settings: "
                                 f"{', '.join(n for n, f in known.items() if f.metadata['config'])}")
            if not known[key].metadata["config"]:
                raise UsageError(f"the model config's {block}: '{key}' is set per run, not by a model config; "
                                 "remove it from the config")
            found[key] = (value, block)
    return found


def resolve(cls, flags, model_config=None, blocks=(), fixed=None):
    """The settings of one run and where each value came from, in the one order every method uses:
    ``fixed`` by the method's variant > a flag the user gave (``flags``: name -> value, missing or None when
    not given) > the model config's per-method ``blocks`` > the paper's default. Returns
    ``(settings, {field: "flag" | "model config <block>" | "paper" | "method"})``, the settings checked."""
    fixed = fixed or {}
    from_config = model_config_defaults(cls, model_config or {}, blocks)
    values, sources = {}, {}
    for f in setting_fields(cls):
        if f.name in fixed:
            values[f.name], sources[f.name] = fixed[f.name], "method"
        elif flags.get(f.name) is not None:
            values[f.name], sources[f.name] = flags[f.name], "flag"
        elif f.name in from_config:
            value, block = from_config[f.name]
            values[f.name], sources[f.name] = value, f"model config {block}"
        else:
            values[f.name], sources[f.name] = f.default, "paper"
    cls.adjust_defaults(values, sources)
    return cls(**values).check(), sources


def describe(settings, sources):
    """``--show_settings``: one line per setting, its value and where it came from."""
    width = max(len(name) for name in sources)
    return "\n".join(f"{name:<{width}}  {_shown(getattr(settings, name))!s:<28}  ({sources[name]})" for name in sources)


def settings_table(cls, fixed=(), model_defaults=None, model_name="tiny-sd"):
    """A markdown table of a method's settings: flag, the paper's default (SD v1), ``model_name``'s default
    (its config's per-method block), whether a model config may set it, and the help."""
    model_defaults = model_defaults or {}
    rows = ["| flag | paper (SD v1) | " + model_name + " | model config may set | what it does |",
            "| --- | --- | --- | --- | --- |"]
    for f in setting_fields(cls):
        if not f.metadata["flag"] or f.name in fixed:
            continue
        paper = "required" if f.metadata["required"] else f"`{_shown(f.default)}`"
        ours = f"`{_shown(model_defaults[f.name])}`" if f.name in model_defaults else "same"
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `--{f.name}` | {paper} | {ours} | {'yes' if f.metadata['config'] else 'no'} | {help_text} |")
    return "\n".join(rows)
