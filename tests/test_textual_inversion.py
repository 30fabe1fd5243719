"""The textual-inversion attack (CCE): the learned word replaces only its placeholder's input embedding, learning
moves the word and nothing of the model, and attack.py learns it once from the base model's images, records
them, resumes, and refuses to run without images in one line."""
import json

import pandas as pd
import pytest
import torch

from ldm.attacks.textual_inversion import (PLACEHOLDER, TextualInversionSettings, learn_word, learned_word,
                                           with_word)
from ldm.erasure.concept_data import encode_images

from conftest import call_script, one_line_error


def token_row(encoder, word):
    ids = encoder.tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return encoder.transformer.get_input_embeddings().weight[ids[0]].detach()


def test_the_word_replaces_only_its_placeholder(tiny):
    encoder = tiny.cond_stage_model
    with torch.no_grad(), learned_word(encoder, token_row(encoder, "moon")):
        inside = tiny.get_learned_conditioning([f"a red {PLACEHOLDER}", ""])
    with torch.no_grad():
        plain = tiny.get_learned_conditioning(["a red moon", ""])
        untouched = tiny.get_learned_conditioning([f"a red {PLACEHOLDER}"])
    assert torch.equal(inside, plain)
    assert not torch.equal(untouched[0], plain[0])  # outside the block the placeholder is its own word again


def test_the_concepts_name_gives_way_to_the_word():
    assert with_word("a red moon in the style of Mondrian", "moon") == f"a red {PLACEHOLDER} in the style of Mondrian"
    assert with_word("a star in the style of van gogh", "Van Gogh") == f"a star in the style of {PLACEHOLDER}"
    assert with_word("a red circle", "moon") == f"{PLACEHOLDER} a red circle"


def test_learning_moves_the_word_and_nothing_of_the_model(new_tiny):
    model = new_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    latents = encode_images(model, torch.rand(2, 3, 64, 64) * 2 - 1)
    settings = TextualInversionSettings(steps=3, batch_size=2, lr=1e-1, init_word="object")
    vector, losses = learn_word(model, latents, ["{}", "a photo of {}"], settings)
    start = token_row(model.cond_stage_model, "object")
    assert len(losses) == 3 and vector.shape == start.shape and not torch.allclose(vector, start)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    again, _ = learn_word(model, latents, ["{}", "a photo of {}"], settings)
    assert torch.equal(vector, again)  # seeded


def test_attack_script_learns_once_records_its_images_and_resumes(tmp_path):
    prompts = tmp_path / "moon.csv"
    pd.DataFrame({"case_number": [0, 1], "prompt": ["a moon", "a red moon"], "evaluation_seed": [0, 1]}).to_csv(
        prompts, index=False)
    args = ["--model_name", "tiny-sd", "--concept", "moon", "--prompts_path", prompts, "--save_path", tmp_path / "out",
            "--attack", "textual-inversion", "--ti_steps", 3, "--ti_num_images", 2, "--ddim_steps", 3]
    done = call_script("eval-scripts/attack.py", *args)
    assert done.returncode == 0, done.stderr
    row = pd.read_csv(tmp_path / "out" / "summary.csv").iloc[0]
    assert row.attack == "textual-inversion" and row.images == 2 and row.asr_post >= row.asr_pre
    folder = next((tmp_path / "out").glob("textual-inversion-moon-*"))
    record = json.loads((folder / "learned-word.json").read_text())
    assert record["images"] == 2 and record["steps"] == 3 and len(record["sha256"]) == 64
    assert json.loads((folder / "attack.json").read_text())["images"]["sha256"] == record["sha256"]
    table = pd.read_csv(folder / "per-prompt.csv")
    assert table.adversarial_prompt.tolist() == [f"a {PLACEHOLDER}", f"a red {PLACEHOLDER}"]
    assert (folder / "learned-word-losses.png").is_file()
    learned = (folder / "learned-word.safetensors").stat().st_mtime_ns
    again = call_script("eval-scripts/attack.py", *args)
    assert again.returncode == 0, again.stderr
    assert (folder / "learned-word.safetensors").stat().st_mtime_ns == learned
    assert len(pd.read_csv(tmp_path / "out" / "summary.csv")) == 1


@pytest.mark.parametrize("flags,message", [
    (["--concept", "unicorn", "--judge", "resnet50", "--prompts_path", "PROMPTS"],
     "learns its word from images of 'unicorn': give a folder of them with --ti_images"),
    (["--concept", "moon", "--ti_steps", 0], "--ti_steps, --ti_batch_size and --ti_num_images must be >= 1"),
    (["--concept", "moon", "--ti_lr", 0], "--ti_lr must be positive"),
])
def test_bad_input_is_one_line(flags, message, tmp_path):
    prompts = tmp_path / "p.csv"
    pd.DataFrame({"case_number": [0], "prompt": ["a unicorn"], "evaluation_seed": [0]}).to_csv(prompts, index=False)
    flags = [prompts if f == "PROMPTS" else f for f in flags]
    line = one_line_error(call_script("eval-scripts/attack.py", "--model_name", "tiny-sd", "--attack",
                                      "textual-inversion", *flags, "--save_path", tmp_path))
    assert message in line, line
