"""The concept world, its captions and prompt sets, and prompt-CSV validation."""
import numpy as np
import torch
import pandas as pd
import pytest

from ldm.data.concepts import (ATTRIBUTES, COLORS, EMPTY_CAPTION_RATE, OBJECTS, STYLES, TEMPLATES, fill_template,
                               random_caption, render, render_with_mask)
from ldm.data.tiny_sd import FILLER_RATE, FRAMES, CaptionFiller, held_out_words
from ldm.data.prompt_sets import (all_concepts, concept_filename, concept_prompts, other_template_prompts,
                                  quality_prompts)
from ldm.paths import REPO_ROOT
from ldm.prompts import read_prompts
from ldm.util import UsageError

from conftest import SHARED

DATA = REPO_ROOT / "data" / "tiny-sd"


def test_vocabulary_is_the_public_one():
    assert OBJECTS == ("circle", "square", "triangle", "star", "heart", "cross", "hexagon", "moon")
    assert tuple(COLORS) == ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
    assert STYLES == ("none", "Van Gogh", "Seurat", "Mondrian", "Pollock", "Rothko", "Hokusai")


def test_render_is_deterministic_and_varies_with_seed():
    a = render("star", "red", "Seurat", seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render("star", "red", "Seurat", seed=3))
    assert not np.array_equal(a, render("star", "red", "Seurat", seed=4))


@pytest.mark.parametrize("style", STYLES)
def test_object_color_stays_dominant_under_every_style(style):
    # the object's colored pixels (not its overlay of lines, dots or splatter) read as its own color
    for k, name in enumerate(COLORS):
        for seed in range(3):
            image, mask = render_with_mask(OBJECTS[(k + seed) % 8], name, style, seed=seed)
            pixels = image[mask].astype(float)
            distances = np.stack([np.abs(pixels - np.array(c)).sum(1) for c in COLORS.values()])
            colored = distances.min(0) < 100
            assert colored.mean() > 0.3 and np.mean(distances.argmin(0)[colored] == k) > 0.9, (style, name, seed)


SYMMETRIC = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon")


@pytest.mark.parametrize("name", OBJECTS)
def test_objects_are_upright_with_bounded_size_and_position(name):
    from ldm.data.concepts import JITTER, RADIUS, SIZE
    for seed in range(12):
        _, mask = render_with_mask(name, "red", "none", seed=seed)
        ys, xs = np.nonzero(mask)
        height = ys.max() - ys.min() + 1
        assert 1.0 * RADIUS[0] <= height <= 2.2 * RADIUS[1], (name, seed, height)
        free = SIZE / 2 - RADIUS[0] - 2
        box_centre = (xs.max() + xs.min() + 1) / 2
        assert abs(box_centre - SIZE / 2) <= JITTER * free + 2.5, (name, seed)  # the moon's box is off-centre by design
        if name in SYMMETRIC:  # upright: mirror-symmetric about a vertical axis, which rotation would break
            left, right = int(xs.min()), int(xs.max())
            crop = mask[:, left:right + 1]
            assert np.logical_and(crop, crop[:, ::-1]).sum() / np.logical_or(crop, crop[:, ::-1]).sum() > 0.85, (name, seed)


def test_hexagon_and_circle_are_apart():
    """Same seed, so same size and place: the hexagon's corners and flat sides reach well outside the circle."""
    for seed in range(8):
        _, circle = render_with_mask("circle", "red", "none", seed=seed)
        _, hexagon = render_with_mask("hexagon", "red", "none", seed=seed)
        assert hexagon.sum() > 1.3 * circle.sum()
        assert np.logical_and(circle, hexagon).sum() / np.logical_or(circle, hexagon).sum() < 0.8
        assert (hexagon & ~circle).sum() > 0.25 * circle.sum()


def test_templates_put_each_word_at_several_positions():
    positions = {key: set() for key in ("{object}", "{color}", "style}")}
    for template in TEMPLATES:
        words = template.replace(",", "").replace(":", "").split()
        for key in positions:
            positions[key].update(i for i, w in enumerate(words) if w.endswith(key))
    for key, found in positions.items():
        assert 0 in found and len(found) >= 3, (key, found)


def test_captions():
    assert len(TEMPLATES) >= 10
    rng = np.random.default_rng(0)
    captions = [random_caption("heart", "pink", "Rothko", rng) for _ in range(4000)]
    assert abs(np.mean([c == "" for c in captions]) - EMPTY_CAPTION_RATE) < 0.02
    assert len(set(captions)) >= 10
    assert fill_template("a {color} {object} {in_style}", "moon", "orange", "Van Gogh") == (
        "an orange moon in the style of Van Gogh", {"object": "moon", "color": "orange", "style": "Van Gogh"})
    assert fill_template("a painting {by_style}", "moon", "red", "Seurat")[1] == {"style": "Seurat"}



def test_padded_captions_fit_the_context_and_move_concept_words_across_it():
    filler = CaptionFiller(max_length=20)
    rng = np.random.default_rng(0)
    padded, style_positions = 0, set()
    for _ in range(3000):
        caption = random_caption("heart", "pink", "Pollock", rng)
        out = filler(caption, rng)
        assert caption in out and filler.length(out) <= 18  # BOS and EOS make 20
        padded += out != caption
        tokens = filler.tokenizer.tokenize(out)
        style_positions.update(i for i, t in enumerate(tokens) if t == "pollock</w>")
    assert abs(padded / 3000 - FILLER_RATE * (1 - EMPTY_CAPTION_RATE)) < 0.05
    assert set(range(18)) <= style_positions  # the style word seen at every position a prompt may put it


def test_filler_names_no_concept_and_keeps_evaluation_phrasings_unseen():
    filler = CaptionFiller(max_length=20)
    assert len(filler.words) > 20000
    concept_words = {w.lower() for v in OBJECTS + tuple(COLORS) + STYLES[1:] for w in v.split()}  # style none is "flat colors"
    assert not concept_words & set(filler.words)
    held_out = held_out_words()
    assert "drawing" in held_out and not held_out & set(filler.words)
    assert not any("drawing" in frame for frame in FRAMES)
    for frame in FRAMES:  # filler adds no new concept words through its frames either
        assert not concept_words & set(frame.split())

def test_committed_prompt_sets_match_their_generator():
    pd.testing.assert_frame_equal(pd.read_csv(DATA / "quality.csv", keep_default_na=False),
                                  quality_prompts().astype({"evaluation_seed": "int64"}), check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(DATA / "quality-other-templates.csv", keep_default_na=False),
                                  other_template_prompts(), check_dtype=False)
    for concept in all_concepts():
        committed = pd.read_csv(DATA / "concepts" / concept_filename(concept), keep_default_na=False)
        pd.testing.assert_frame_equal(committed, concept_prompts(concept), check_dtype=False)
        assert set(committed["set"]) == {"alone", "with_others", "without"}


def test_quality_set_covers_every_attribute_value():
    prompts = read_prompts(DATA / "quality.csv")
    for attribute, values in ATTRIBUTES.items():
        assert set(prompts[attribute]) == set(values)


@pytest.mark.parametrize("concept", ["circle", "Van Gogh", "blue"])
def test_concept_sets_name_the_concept_only_where_they_should(concept):
    prompts = concept_prompts(concept)
    attribute = next(a for a, v in ATTRIBUTES.items() if concept in v)
    with_it = prompts[prompts["set"] != "without"]
    assert (with_it[attribute] == concept).all()
    assert (prompts[prompts["set"] == "without"][attribute] != concept).all()
    assert not prompts[prompts["set"] == "without"]["prompt"].str.contains(concept).any()
    without = prompts[prompts["set"] == "without"]
    for head, values in ATTRIBUTES.items():  # every other value measured on several prompts, evenly
        counts = without[head].value_counts()
        expected = [v for v in values if v not in ("none", concept)]
        assert sorted(counts.index) == sorted(expected) and counts.min() >= 6 and counts.max() - counts.min() <= 2
    pairs = without.groupby("color")["object"].nunique()
    assert (pairs >= 4).all()  # a color is not measured on one object only


def _csv(tmp_path, text):
    path = tmp_path / "prompts.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("prompt,case_number\na star,0\n", "lacks column(s) evaluation_seed"),
    ("prompt,evaluation_seed,case_number\na star,12x,0\n", "row 2 column 'evaluation_seed' is '12x', not an integer"),
    ("prompt,evaluation_seed,case_number\na star,1,0\nthe moon,2,1.5\n", "row 3 column 'case_number'"),
    ("prompt,evaluation_seed,case_number\na star,1,0\n  ,2,1\n", "row 3 column 'prompt' is empty"),
    ("prompt,evaluation_seed,case_number\na star,1,0\nthe moon,2,0\n", "repeats case_number 0"),
    ("prompt,evaluation_seed,case_number\n", "has no rows"),
])
def test_bad_prompt_csvs(tmp_path, text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompts(_csv(tmp_path, text))


def test_empty_prompts_can_be_skipped(tmp_path):
    prompts = read_prompts(_csv(tmp_path, "prompt,evaluation_seed,case_number\na star,1,0\n,2,1\n"), skip_empty=True)
    assert prompts["case_number"].tolist() == [0]


@pytest.mark.skipif(not (SHARED / "reference-data").is_dir(), reason="the reference data beside the checkout is absent")
def test_esd_prompt_csvs_read_unchanged():
    folder = SHARED / "reference-data" / "esd-prompts"
    sizes = {path.name: len(read_prompts(path, skip_empty=path.name.startswith("unsafe")))
             for path in sorted(folder.glob("*.csv"))}
    assert sizes["coco_30k.csv"] == 30000  # case numbers from image_id
    assert sizes["unsafe-prompts4703.csv"] == 4702  # one row has no prompt
    assert sizes["vangogh_prompts.csv"] == 50
    i2p = read_prompts(folder / "unsafe-prompts4703.csv", require_guidance=True, skip_empty=True)
    assert i2p["evaluation_seed"].max() > 2**31  # seeds beyond int32 are kept exactly


def test_precomputed_first_stage_moments_match_encoding(small_model):
    from torch.utils.data import default_collate
    from ldm.data.tiny_sd import ConceptWorld, WithFirstStageMoments
    world = ConceptWorld(size=4, seed=5)
    batch = default_collate([world[i] for i in range(4)])
    cached = default_collate([WithFirstStageMoments(world, small_model.first_stage_model)[i] for i in range(4)])
    batch["txt"] = cached["txt"] = batch["caption"]  # the SD v1 config's cond_stage_key
    torch.manual_seed(0)
    z_encoded, captions = small_model.get_input(batch, "image")
    torch.manual_seed(0)
    z_cached, _ = small_model.get_input(cached, "image")
    assert torch.allclose(z_encoded, z_cached, atol=2e-2)  # moments are stored in fp16
    assert len(captions) == 4


def test_crops_share_the_pool():
    from ldm.data.tiny_sd import ConceptWorld
    world = ConceptWorld(size=3, seed=1)
    crops = world.cropped(32)
    assert crops[0]["image"].shape == (32, 32, 3) and world[0]["image"].shape == (64, 64, 3)
    assert crops.images is world.images
