"""Attack an erased model: does the concept come back under an adversarial prompt?

    python eval-scripts/attack.py --model_name esd-x_moon --concept moon --save_path outputs/attacks
    python eval-scripts/attack.py --model_name tiny-sd --concept moon --attack ringabell --save_path outputs/attacks
    python eval-scripts/attack.py --model_name esd-u_nudity --concept nudity --judge nudenet \
        --prompts_path nudity.csv --save_path outputs/attacks          # a run on SD v1 weights (GPU)

For every prompt naming the concept (default: its tiny-sd prompt set, sets alone and with_others; any
ESD-format CSV with --prompts_path) and each of its --num_samples start latents, the base model (the run's
own base, or --base_model) draws the prompt, and the judge must find the concept in at least half of these
images (else the concept is not one the base draws, and the script says so instead of reporting an ASR).
Then the erased model draws the prompt and an adversarial prompt from the same start latent, and the judge
looks at both. Judges (ldm/attacks/judges.py): the tiny-sd evaluator for tiny-sd concepts; on SD,
--judge nudenet (UnlearnDiffAtk's nudity rule) or --judge resnet50 (top-1 ImageNet class = the concept).
Attacks (ldm/attacks/): UnlearnDiffAtk (default: 5 prefix tokens, 40 projected gradient steps on the erased
model's denoising loss of the base model's image) and Ring-A-Bell (a genetic search over the vocabulary for
tokens whose embedding approaches the prompt's plus eta times the concept vector; it never looks at the
erased model). Writes, under --save_path: summary.csv (one row per attack run: attack, concept, prompts,
images, asr_pre, asr_post, their 95% intervals, asr_attacked for the adversarial prompts alone, asr_base),
and per run a folder with base.csv, per-prompt.csv (adversarial prompts as text, verdicts), the images
(<case>_<sample>_{base,pre,post}.png) and attack.json. A rerun resumes; another model, prompt file, judge
or setting goes to another folder.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import torch

from ldm.attacks.harness import ATTACKS, AttackRun, attack_prompts, settings_for, write_summary
from ldm.attacks.textual_inversion import TextualInversionSettings, images_record
from ldm.attacks.judges import JUDGES, NUDENET_THRESHOLD, default_judge, make_judge
from ldm.cli import new_parser, parse_device, run
from ldm.data.prompt_sets import all_concepts, concept_filename
from ldm.erasure.cie import templates_of
from ldm.erasure.concept_data import prepare_training_latents
from ldm.loading import load_model, load_run_base
from ldm.paths import EVALUATOR_PATH, REPO_ROOT, outputs_dir
from ldm.prompts import read_prompts
from ldm.text2image import check_generation_args
from ldm.util import UsageError, file_sha256


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", required=True, help="the erased model: a run under models/, tiny-sd, or "
                                                             "a name for --config_path/--ckpt_path")
    parser.add_argument("--config_path", help="with --ckpt_path: attack this CompVis model instead of a run")
    parser.add_argument("--ckpt_path")
    parser.add_argument("--concept", required=True, help="the erased concept the judge looks for")
    parser.add_argument("--save_path", default=str(outputs_dir() / "attacks"))
    parser.add_argument("--attack", default="unlearndiffatk", choices=ATTACKS)
    parser.add_argument("--prompts_path", help="default: data/tiny-sd/concepts/<concept>.csv")
    parser.add_argument("--base_model", help="draws the check images and UnlearnDiffAtk's targets (default: the "
                                             "run's own base; a model that is not a run is its own base)")
    parser.add_argument("--judge", choices=JUDGES, help="default: tiny-sd for a tiny-sd concept")
    parser.add_argument("--judge_threshold", type=float, default=NUDENET_THRESHOLD, help="NudeNet: score above which "
                                                                                       "an exposed part counts")
    parser.add_argument("--num_samples", type=int, default=1, help="start latents per prompt (ESD's convention)")
    parser.add_argument("--image_size", type=int, help="pixels (default: the model's own size)")
    parser.add_argument("--prefix_tokens", type=int, default=5, help="UnlearnDiffAtk: adversarial prefix tokens")
    parser.add_argument("--steps", type=int, default=40, help="UnlearnDiffAtk: projected gradient steps")
    parser.add_argument("--attack_lr", type=float, default=1e-2, help="UnlearnDiffAtk: Adam's lr on the prefix")
    parser.add_argument("--length", type=int, default=16, help="Ring-A-Bell: tokens in the adversarial prompt")
    parser.add_argument("--population", type=int, default=64, help="Ring-A-Bell: genetic search population")
    parser.add_argument("--generations", type=int, default=100, help="Ring-A-Bell: genetic search generations")
    parser.add_argument("--eta", type=float, default=3.0, help="Ring-A-Bell: strength of the concept vector")
    parser.add_argument("--prompt_templates", default="data/esd-prompt-templates.txt",
                        help="Ring-A-Bell: phrasings whose pairs with and without the concept give its vector; "
                             "textual inversion: the captions it learns the word in")
    ti = TextualInversionSettings()
    parser.add_argument("--ti_images", help="textual inversion: a folder of images of the concept to learn the word "
                                            "from (default for a tiny-sd concept: the base model draws them)")
    parser.add_argument("--ti_num_images", type=int, default=ti.num_images,
                        help="textual inversion: images the base model draws when no --ti_images")
    parser.add_argument("--ti_steps", type=int, default=ti.steps, help="textual inversion: Adam steps on the word")
    parser.add_argument("--ti_lr", type=float, default=ti.lr, help="textual inversion: Adam's lr")
    parser.add_argument("--ti_batch_size", type=int, default=ti.batch_size, help="textual inversion: images a step")
    parser.add_argument("--ti_init_word", default=ti.init_word, help="textual inversion: the word it starts from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluator_path", default=str(EVALUATOR_PATH))
    args = parser.parse_args(argv)

    check_generation_args(args)
    judge_name = args.judge or default_judge(args.concept)
    if args.prompts_path is None and args.concept not in all_concepts():
        raise UsageError(f"'{args.concept}' has no tiny-sd prompt set: give its prompts with --prompts_path")
    prompts_path = args.prompts_path or REPO_ROOT / "data/tiny-sd/concepts" / concept_filename(args.concept)
    device = parse_device(args.device)
    prompts = attack_prompts(read_prompts(prompts_path), args.concept)
    settings = settings_for(args.attack, args)
    if args.attack == "textual-inversion" and args.ti_images is None and args.concept not in all_concepts():
        raise UsageError(f"the textual-inversion attack learns its word from images of '{args.concept}': give a "
                         "folder of them with --ti_images")
    judge = make_judge(judge_name, args.concept, device, args.evaluator_path, args.judge_threshold)
    erased = load_model(args.model_name, config_path=args.config_path, ckpt_path=args.ckpt_path, device=device)
    if erased.kind == "diffusers":
        raise UsageError(f"'{args.model_name}' is a diffusers folder; attacks run on CompVis models and runs")
    base = load_run_base(erased, device) if args.base_model is None else load_model(args.base_model, device=device)
    word_images = None
    if args.attack == "textual-inversion":  # the concept's images: the user's folder, else drawn by the base
        latents, data = prepare_training_latents(base, args.concept, args.ti_images, settings.num_images)
        word_images = latents, images_record(data["folder"]), data["folder"]
    attack = AttackRun(erased.model, base.model, judge, args.concept, args.attack, settings, erased.identity,
                       file_sha256(prompts_path), args.save_path, templates_of(args.prompt_templates) or ["{}"],
                       args.eta, args.guidance_scale, args.ddim_steps, args.num_samples, args.image_size, judge_name,
                       word_images)
    table = attack.run(prompts)
    summary = write_summary(args.save_path, attack.summary(table))
    row = summary.iloc[-1]
    print(f"{args.attack} on '{args.concept}', model {erased.name} ({erased.sha256[:12]}), {row.prompts} prompts, "
          f"{row.images} images, judge {row.judge}: base {row.asr_base:.1%} [{row.asr_base_low:.0%}, "
          f"{row.asr_base_high:.0%}], ASR pre {row.asr_pre:.1%} [{row.asr_pre_low:.0%}, {row.asr_pre_high:.0%}], "
          f"post {row.asr_post:.1%} [{row.asr_post_low:.0%}, {row.asr_post_high:.0%}] "
          f"(adversarial prompts alone {row.asr_attacked:.1%})")
    print(f"per prompt: {attack.folder / 'per-prompt.csv'}; summary: {args.save_path}/summary.csv")


if __name__ == "__main__":
    run(main)
