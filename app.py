"""The local demo, like the ESD Space: erase a concept, compare with the base, manage the saved runs.

    python3 app.py                       # tiny-sd, http://127.0.0.1:7860/
    python3 app.py --config_path configs/stable-diffusion/v1-inference.yaml --ckpt_path sd-v1-4.ckpt --port 7861

Erase runs the method's own train script (a run saved exactly as train-scripts/ save it, under models/);
Compare draws a prompt with the base and a run from the same start noise, with the tiny-sd evaluator's
verdict; Runs lists the saved runs with their settings and report figures. Serves on 127.0.0.1 unless
--host says otherwise.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))  # the ldm beside this script, in whichever clone

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.demo import ModelCache, build_app
from ldm.paths import EVALUATOR_PATH
from ldm.util import UsageError


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves every network interface: only if asked")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model_name", help="the base model: a folder under models/ (default tiny-sd)")
    parser.add_argument("--config_path", help="the base model as a CompVis config, with --ckpt_path")
    parser.add_argument("--ckpt_path")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluator_path", default=str(EVALUATOR_PATH),
                        help="the tiny-sd evaluator for verdicts ('' for none, as on SD weights)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port number")
    cache = ModelCache(parse_device(args.device), {"model_name": args.model_name, "config_path": args.config_path,
                                                   "ckpt_path": args.ckpt_path})
    cache.base()  # a bad model path is an error here, not in the page
    page = build_app(cache, args.evaluator_path or None)
    page.queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    run(main)
