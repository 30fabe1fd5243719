"""What every script shares: one-line errors for bad input, device parsing, config/checkpoint flags."""
import argparse
import sys

import torch

from ldm.paths import TINY_SD_DIR
from ldm.util import UsageError

DEFAULT_CONFIG = TINY_SD_DIR / "config.yaml"
DEFAULT_CKPT = TINY_SD_DIR / "model.ckpt"


def run(main, argv=None, **kwargs):
    """Call ``main(argv, **kwargs)`` (``argv`` None: the command line); a UsageError becomes ``error: <message>``
    on stderr and exit status 2."""
    try:
        main(argv, **kwargs)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def parse_device(name):
    """``cpu``, ``cuda``, ``cuda:1`` or a bare GPU index ``1``, checked to exist."""
    name = str(name).strip()
    device = torch.device(f"cuda:{name}" if name.isdigit() else name) if name else None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device '{name}' unknown; use cpu, cuda, cuda:N or a GPU index N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise UsageError(f"device '{name}' does not exist: this machine has {count} CUDA device(s); use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' is not available on this machine; use cpu")
    return device


def add_model_args(parser, config_default=DEFAULT_CONFIG, ckpt_default=DEFAULT_CKPT):
    """The flags that name a CompVis model: ``--config_path``, ``--ckpt_path``, ``--unsafe_pickle``."""
    parser.add_argument("--config_path", default=str(config_default), help="CompVis model config (YAML)")
    parser.add_argument("--ckpt_path", default=str(ckpt_default), help="CompVis checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--unsafe_pickle", action="store_true",
                        help="fully unpickle a .ckpt you trust (default: tensors only, no code from the file runs)")
    return parser


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors (unknown choice, missing flag) as one ``error:`` line, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flags with their defaults; the description (a script's docstring, with its example commands) as written."""


def new_parser(description, add_help=True):
    """The scripts' parser: a usage error, like every other error, is one line and exit status 2."""
    return OneLineParser(description=description, formatter_class=HelpFormatter, add_help=add_help)
