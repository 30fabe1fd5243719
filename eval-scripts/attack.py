"""Attack an erased model: does the concept come back under an adversarial prompt?

    python eval-scripts/attack.py --model_name esd-x_moon --concept moon --save_path outputs/attacks
    python eval-scripts/attack.py --model_name tiny-sd --concept moon --attack ringabell --save_path outputs/attacks

For every prompt naming the concept (default: its tiny-sd prompt set, sets alone and with_others; any
ESD-format CSV with --prompts_path), the erased model draws the prompt and an adversarial prompt from the
prompt's seed, and the tiny-sd evaluator judges both. Attacks (ldm/attacks/): UnlearnDiffAtk (default:
5 prefix tokens, 40 projected gradient steps on the erased model's denoising loss of the base model's
image) and Ring-A-Bell (a genetic search over the vocabulary for tokens whose embedding approaches the
prompt's plus eta times the concept vector; it never looks at the erased model). Writes, under
--save_path: summary.csv (one row per attack run: attack, concept, prompts, asr_pre, asr_post, their 95%
intervals, asr_attacked for the adversarial prompts alone), and per run a folder with per-prompt.csv
(adversarial prompts as text, verdicts), the images (<case>_pre.png, <case>_post.png) and attack.json.
A rerun resumes; another model, prompt file or setting goes to another folder.
"""
import torch

from ldm.attacks.harness import ATTACKS, AttackRun, attack_prompts, concept_judge, settings_for, write_summary
from ldm.cli import new_parser, parse_device, run
from ldm.data.prompt_sets import concept_filename
from ldm.erasure.cie import templates_of
from ldm.evaluator import load_evaluator
from ldm.loading import load_model
from ldm.paths import MODELS_DIR, REPO_ROOT
from ldm.prompts import read_prompts
from ldm.util import UsageError, file_sha256


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", required=True, help="the erased model: a run under models/ (or tiny-sd)")
    parser.add_argument("--concept", required=True, help="the erased concept the judge looks for")
    parser.add_argument("--save_path", default="outputs/attacks")
    parser.add_argument("--attack", default="unlearndiffatk", choices=ATTACKS)
    parser.add_argument("--prompts_path", help="default: data/tiny-sd/concepts/<concept>.csv")
    parser.add_argument("--base_model", default="tiny-sd", help="draws UnlearnDiffAtk's target images")
    parser.add_argument("--prefix_tokens", type=int, default=5, help="UnlearnDiffAtk: adversarial prefix tokens")
    parser.add_argument("--steps", type=int, default=40, help="UnlearnDiffAtk: projected gradient steps")
    parser.add_argument("--attack_lr", type=float, default=1e-2, help="UnlearnDiffAtk: Adam's lr on the prefix")
    parser.add_argument("--length", type=int, default=16, help="Ring-A-Bell: tokens in the adversarial prompt")
    parser.add_argument("--population", type=int, default=64, help="Ring-A-Bell: genetic search population")
    parser.add_argument("--generations", type=int, default=100, help="Ring-A-Bell: genetic search generations")
    parser.add_argument("--eta", type=float, default=3.0, help="Ring-A-Bell: strength of the concept vector")
    parser.add_argument("--prompt_templates", default="data/esd-prompt-templates.txt",
                        help="Ring-A-Bell: phrasings whose pairs with and without the concept give its vector")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluator_path", default=str(MODELS_DIR / "tiny-sd" / "evaluator.safetensors"))
    args = parser.parse_args()

    prompts_path = args.prompts_path or REPO_ROOT / "data/tiny-sd/concepts" / concept_filename(args.concept)
    device = parse_device(args.device)
    evaluator = load_evaluator(args.evaluator_path, device)
    judge = concept_judge(evaluator, args.concept)
    prompts = attack_prompts(read_prompts(prompts_path), args.concept)
    settings = settings_for(args.attack, args)
    erased = load_model(args.model_name, device=device)
    if erased.kind == "diffusers":
        raise UsageError(f"'{args.model_name}' is a diffusers folder; attacks run on CompVis models and runs")
    base = None
    if args.attack == "unlearndiffatk":  # the base draws the target images; attacking the base itself, load it once
        base = erased if args.base_model == args.model_name else load_model(args.base_model, device=device)
    attack = AttackRun(erased.model, base.model if base else None, judge, args.concept, args.attack, settings,
                       erased.identity, file_sha256(prompts_path), args.save_path,
                       templates_of(args.prompt_templates) or ["{}"], args.eta, args.guidance_scale, args.ddim_steps)
    table = attack.run(prompts)
    summary = write_summary(args.save_path, attack.summary(table))
    row = summary.iloc[-1]
    print(f"{args.attack} on '{args.concept}', model {erased.name} ({erased.sha256[:12]}), {row.prompts} prompts: "
          f"ASR pre {row.asr_pre:.1%} [{row.asr_pre_low:.0%}, {row.asr_pre_high:.0%}], "
          f"post {row.asr_post:.1%} [{row.asr_post_low:.0%}, {row.asr_post_high:.0%}] "
          f"(adversarial prompts alone {row.asr_attacked:.1%})")
    print(f"per prompt: {attack.folder / 'per-prompt.csv'}; summary: {args.save_path}/summary.csv")


if __name__ == "__main__":
    run(main)
