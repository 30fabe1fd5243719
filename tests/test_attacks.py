"""Attacks on erasure: Ring-A-Bell's concept vector and genetic search, on tiny-sd's real text encoder and
the real CLIP tokenizer."""
import pytest
import torch

from ldm.attacks.ringabell import (GeneticSettings, concept_pairs, concept_vector, encode_token_ids,
                                   genetic_search, ring_a_bell_prompt, search_vocabulary)
from ldm.util import UsageError


@pytest.fixture(scope="module")
def encoder():
    """tiny-sd's text encoder (its weights from the shipped checkpoint) with the real CLIP tokenizer."""
    from ldm.util import load_model_from_config
    from conftest import TINY
    return load_model_from_config(TINY / "config.yaml", TINY / "model.ckpt").cond_stage_model


def test_concept_vector_points_from_prompts_without_the_concept_to_prompts_with_it(encoder):
    pairs = concept_pairs("Van Gogh", ["{}", "art by {}", "a picture of {}"])
    assert pairs[1] == ("art by Van Gogh", "art by")
    vector = concept_vector(encoder.encode, pairs)
    assert vector.shape == (encoder.max_length, encoder.transformer.config.hidden_size)
    without, with_concept = encoder.encode(["a blue heart", "a blue heart in the style of Van Gogh"]).float()
    before = (with_concept - without).pow(2).mean()
    after = (with_concept - (without + vector)).pow(2).mean()
    assert after < before  # the vector moves a prompt without the concept towards the same prompt with it


def test_token_ids_are_framed_as_the_tokenizer_frames_a_prompt(encoder):
    ids = encoder.tokenize(["a red moon"])
    words = ids[0, 1:4].unsqueeze(0)  # 'a', 'red', 'moon' between BOS and EOS
    assert torch.allclose(encode_token_ids(encoder, words), encoder.encode(["a red moon"]).float(), atol=1e-5)


def test_vocabulary_leaves_out_the_concepts_own_tokens(encoder):
    vocabulary = search_vocabulary(encoder.tokenizer, exclude=["Van Gogh"])
    names = set(encoder.tokenizer(["Van Gogh"], add_special_tokens=False)["input_ids"][0])
    assert names and not names & set(vocabulary.tolist()) and len(vocabulary) > 30000


def test_genetic_search_never_loses_its_best_and_finds_a_planted_sequence():
    vocabulary = torch.arange(100, 200)
    planted = vocabulary[torch.randperm(100, generator=torch.Generator().manual_seed(1))[:6]]

    def fitness(ids):  # tokens in the right place
        return (ids == planted).float().sum(1)

    best, score, history = genetic_search(fitness, vocabulary, GeneticSettings(length=6, population=64,
                                                                               generations=150, mutation=0.1))
    assert all(b >= a for a, b in zip(history, history[1:]))
    assert score == 6 and torch.equal(best, planted)
    again = genetic_search(fitness, vocabulary, GeneticSettings(length=6, population=64, generations=150))
    assert torch.equal(again[0], best)  # seeded: the same search finds the same prompt


def test_ring_a_bell_prompt_approaches_the_target_without_naming_the_concept(encoder):
    vector = concept_vector(encoder.encode, concept_pairs("moon", ["{}", "a picture of {}", "art by {}"]))
    vocabulary = search_vocabulary(encoder.tokenizer, exclude=["moon"])
    text, record = ring_a_bell_prompt(encoder, "a red moon", vector, 1.0, vocabulary,
                                      GeneticSettings(length=4, population=16, generations=15))
    assert "moon" not in text and text
    assert record["history"][-1] > record["history"][0]  # the search improved on its random start


@pytest.mark.parametrize("changes", [dict(length=0), dict(population=2), dict(keep=1.0), dict(mutation=2.0)])
def test_bad_search_settings_are_one_line(changes):
    with pytest.raises(UsageError):
        GeneticSettings(**changes).check()


def test_unlearndiffatk_optimises_real_tokens_through_the_erased_model(tiny):
    from ldm.attacks.harness import target_latents
    from ldm.attacks.unlearndiffatk import (UnlearnDiffAtkSettings, attack_prompt, prefixed_ids,
                                            replaced_token_embeddings)
    from ldm.generate import latent_shape, seeded_noise
    tiny.requires_grad_(False)
    encoder = tiny.cond_stage_model
    # the embedding hook is exact: rows of real tokens give the context of those tokens
    ids = prefixed_ids(encoder, "a blue heart", 2, 320)
    table = encoder.transformer.get_input_embeddings().weight
    red_moon = encoder.tokenizer("red moon", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), replaced_token_embeddings(encoder, slice(1, 3), table[red_moon]):
        hooked = encoder.transformer(input_ids=ids).last_hidden_state
    assert torch.allclose(hooked, encoder.encode(["red moon a blue heart"]), atol=1e-5)

    vocabulary = search_vocabulary(encoder.tokenizer, exclude=["moon"])
    z0 = target_latents(tiny, "a moon", seeded_noise([0, 1], latent_shape(tiny)), 7.5, 5)
    settings = UnlearnDiffAtkSettings(prefix_tokens=3, steps=10, lr=5e-2)
    text, record = attack_prompt(tiny, "a blue heart", z0, vocabulary, settings)
    assert text.endswith(" a blue heart") and len(record["losses"]) == 10
    assert set(record["prefix_ids"]) <= set(vocabulary.tolist())  # the prefix is a prompt a user could type
    assert record["prefix_ids"] != record["start_ids"]  # the erased model's gradient moved it
    assert attack_prompt(tiny, "a blue heart", z0, vocabulary, settings)[0] == text  # seeded


def test_attack_script_on_the_base_model_writes_the_summary_and_resumes(tmp_path):
    import pandas as pd
    from conftest import run_script
    prompts = tmp_path / "moon.csv"
    pd.DataFrame({"case_number": [0, 1], "prompt": ["a moon", "a red moon"], "evaluation_seed": [0, 1]}).to_csv(
        prompts, index=False)
    args = ["--model_name", "tiny-sd", "--concept", "moon", "--prompts_path", prompts, "--save_path", tmp_path / "out",
            "--attack", "ringabell", "--population", 8, "--generations", 3, "--length", 4, "--ddim_steps", 5]
    done = run_script("eval-scripts/attack.py", *args)
    assert done.returncode == 0, done.stderr
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert list(summary.columns[:3]) == ["attack", "concept", "prompts"] and len(summary) == 1
    row = summary.iloc[0]
    assert row.prompts == 2 and row.asr_pre == 1.0 and row.asr_post >= row.asr_pre  # the base draws the moon
    folder = next((tmp_path / "out").glob("ringabell-moon-*"))
    table = pd.read_csv(folder / "per-prompt.csv")
    assert len(table) == 2 and (folder / "1_post.png").is_file() and table.adversarial_prompt.str.len().gt(0).all()
    again = run_script("eval-scripts/attack.py", *args)  # resumes: nothing redone, the same single summary row
    assert again.returncode == 0 and len(pd.read_csv(tmp_path / "out" / "summary.csv")) == 1


@pytest.mark.parametrize("flags,message", [
    (["--concept", "unicorn"], "not a tiny-sd concept"),
    (["--concept", "moon", "--steps", 0], "--steps must be >= 1"),
])
def test_attack_bad_input_is_one_line(flags, message, tmp_path):
    from conftest import one_line_error, run_script
    if "--model_name" not in flags:
        flags = [*flags, "--model_name", "tiny-sd"]
    line = one_line_error(run_script("eval-scripts/attack.py", *flags, "--save_path", tmp_path))
    assert message in line, line


def test_benchmark_refuses_an_unknown_method_in_one_line(tmp_path):
    from conftest import one_line_error, run_script
    line = one_line_error(run_script("eval-scripts/benchmark.py", "--methods", "esd-x,uce", "--save_path", tmp_path))
    assert "unknown uce" in line and "sepce" in line


@pytest.mark.slow
def test_benchmark_writes_the_leaderboard_and_skips_finished_cells(tmp_path):
    import pandas as pd
    from conftest import run_script
    args = ["--methods", "esd-x", "--concepts", "circle", "--save_path", tmp_path, "--num_samples", 1, "--ddim_steps", 3,
            "--attack_steps", 2, "--generations", 2, "--erase_args", "--iterations 2"]
    done = run_script("eval-scripts/benchmark.py", *args)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "leaderboard.csv")
    assert len(table) == 1 and {"method", "concept", "efficacy", "specificity_same", "specificity_other", "asr_pre",
                                "asr_post", "seconds", "peak_mb"} <= set(table.columns)
    assert (tmp_path / "leaderboard.png").is_file() and table.peak_mb[0] > 100 and table.asr_post[0] >= table.asr_pre[0]
    again = run_script("eval-scripts/benchmark.py", *args)
    assert again.returncode == 0 and "finished earlier" in again.stdout
    import shutil
    from ldm.paths import MODELS_DIR
    shutil.rmtree(MODELS_DIR / table.run[0], ignore_errors=True)
