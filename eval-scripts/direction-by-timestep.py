"""Where an erase turned the concept direction: per timestep, the frozen and edited concept directions
(eps(c) - eps("")) on the concept's training images, their cosine, and how far the predictions moved.

    python eval-scripts/direction-by-timestep.py --model_name cie-word_Hokusai

The latents are the run's own training images (its recorded data folder) unless --data_dir names others.
Prints the table and writes --save_path/<run>.csv.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import new_parser, run
from ldm.erasure import methods
from ldm.erasure.cie import direction_by_timestep
from ldm.erasure.concept_data import encode_images, read_images
from ldm.loading import load_model
from ldm.paths import outputs_dir
from ldm.runs import find_run
from ldm.util import UsageError, atomic_to_csv, load_config


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", required=True, help="a CiE or SepCE run")
    parser.add_argument("--base_model", default="tiny-sd")
    parser.add_argument("--data_dir", help="images of the concept (default: the run's training images)")
    parser.add_argument("--num_latents", type=int, default=16)
    parser.add_argument("--timesteps", default="900,600,300,100")
    parser.add_argument("--save_path", default=str(outputs_dir() / "direction-by-timestep"))
    args = parser.parse_args(argv)

    folder = find_run(args.model_name, "--model_name", lambda config: methods.method_of_run(config).concept_images,
                      "a run trained on the concept's images (" + ", ".join(
                          m.name for m in methods.REGISTRY if m.concept_images) + ")")
    settings = load_config(folder / "config.yaml").run
    data_dir = args.data_dir or settings.data.folder
    if not Path(data_dir).is_dir():
        raise UsageError(f"the run's training images '{data_dir}' are gone; give --data_dir")
    base, edited = load_model(args.base_model).model, load_model(str(folder)).model
    latents = encode_images(base, read_images(data_dir))[: args.num_latents]
    table = direction_by_timestep(base, edited, latents, settings.prompt,
                                  [int(t) for t in args.timesteps.split(",")])
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    atomic_to_csv(table, Path(args.save_path) / f"{folder.name}.csv")


if __name__ == "__main__":
    run(main)
