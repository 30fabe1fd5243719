"""NudeNet scoring: the real detector on benign images, aggregation and comparison on constructed
detections, and the script's one-line errors."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ldm.data.concepts import render
from ldm.nudity import EXPOSED_CLASSES, compare_summaries, parse_classes, summarize
from ldm.util import UsageError

from conftest import call_script, one_line_error


def _det(name, score):
    return {"class": name, "score": score, "box": [0, 0, 10, 10]}


def test_summary_counts_images_per_class_at_threshold():
    detections = [
        [_det("FEMALE_BREAST_EXPOSED", 0.9), _det("FEMALE_BREAST_EXPOSED", 0.8), _det("BELLY_EXPOSED", 0.7)],
        [_det("FEMALE_BREAST_EXPOSED", 0.59), _det("FACE_FEMALE", 0.95)],  # below threshold; not exposed
        [_det("BELLY_EXPOSED", 0.6), _det("FEET_EXPOSED", 0.61)],          # 0.6 counts: "at least"
        [],
    ]
    summary = summarize(detections, tuple(EXPOSED_CLASSES), threshold=0.6).set_index("class")["images"]
    assert summary["FEMALE_BREAST_EXPOSED"] == 1  # two boxes in one image count one image
    assert summary["BELLY_EXPOSED"] == 2 and summary["FEET_EXPOSED"] == 1
    assert summary["total"] == 4 and summary["any"] == 2
    assert summary.drop(["total", "any"]).sum() == summary["total"]
    lenient = summarize(detections, tuple(EXPOSED_CLASSES), threshold=0.5).set_index("class")["images"]
    assert lenient["FEMALE_BREAST_EXPOSED"] == 2 and lenient["any"] == 3
    only_feet = summarize(detections, ("FEET_EXPOSED",), threshold=0.6).set_index("class")["images"]
    assert list(only_feet.index) == ["FEET_EXPOSED", "total", "any"] and only_feet["any"] == 1


def test_comparison_is_percent_change_from_base():
    base = pd.DataFrame({"class": ["BELLY_EXPOSED", "FEET_EXPOSED", "ANUS_EXPOSED", "total"],
                         "images": [40, 10, 0, 50]})
    edited = pd.DataFrame({"class": ["BELLY_EXPOSED", "FEET_EXPOSED", "ANUS_EXPOSED", "total"],
                           "label": ["Belly", "Feet", "Anus", "Total"], "images": [10, 12, 3, 25]})
    change = compare_summaries(edited, base).set_index("class")["change_percent"]
    assert change["BELLY_EXPOSED"] == -75.0 and change["FEET_EXPOSED"] == 20.0 and change["total"] == -50.0
    assert np.isnan(change["ANUS_EXPOSED"])  # no base images: no percentage
    with pytest.raises(UsageError, match="'class' and 'images'"):
        compare_summaries(edited, pd.DataFrame({"x": [1]}))


def test_class_names_are_checked():
    assert parse_classes(None) == tuple(EXPOSED_CLASSES)
    assert parse_classes("FEET_EXPOSED, FACE_MALE") == ("FEET_EXPOSED", "FACE_MALE")
    with pytest.raises(UsageError, match="unknown NudeNet class.*EXPOSED_BREAST_F"):
        parse_classes("EXPOSED_BREAST_F")  # NudeNet 2's name


@pytest.fixture(scope="module")
def benign_folder(tmp_path_factory):
    """Concept-world images (what tiny-sd draws), one unreadable file among them."""
    folder = tmp_path_factory.mktemp("benign")
    drawn = [("star", "red", "none"), ("circle", "pink", "Van Gogh"), ("heart", "orange", "Seurat"),
             ("moon", "blue", "Rothko")]
    for case, (obj, color, style) in enumerate(drawn):
        for sample in range(2):
            Image.fromarray(render(obj, color, style, seed=case * 10 + sample)).save(folder / f"{case}_{sample}.png")
    (folder / "4_0.png").write_bytes(b"not a png")
    prompts = folder.parent / "prompts.csv"
    pd.DataFrame({"prompt": ["a red star", "a circle", "Seurat", "a blue moon", "a heart"],
                  "evaluation_seed": range(5), "case_number": range(5)}).to_csv(prompts, index=False)
    return folder, prompts


def test_real_detector_finds_nothing_exposed_in_benign_images(benign_folder, tmp_path):
    folder, prompts = benign_folder
    save = tmp_path / "scores.csv"
    result = call_script("eval-scripts/nudenet-classes.py", "--folder", folder, "--prompts_path", prompts,
                        "--save_path", save, "--threshold", 0.45)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable: 4_0.png" in result.stdout
    images = pd.read_csv(save)
    assert len(images) == 9 and set(images["prompt"]) >= {"a red star", "a heart"}
    scored = images[images["error"].isna()]
    assert len(scored) == 8 and (scored["exposed"] == 0).all()
    assert images.loc[images["image"] == "4_0.png", "error"].item() == "unreadable"
    summary = pd.read_csv(tmp_path / "scores_summary.csv")
    assert summary["images"].sum() == 0 and summary["images_scored"][0] == 8
    assert summary["images_unreadable"][0] == 1 and summary["threshold"][0] == 0.45
    assert summary["nudenet_version"][0].startswith("3.")
    assert (tmp_path / "scores_summary.png").stat().st_size > 0

    again = call_script("eval-scripts/nudenet-classes.py", "--folder", folder, "--save_path", tmp_path / "b.csv",
                       "--threshold", 0.45, "--compare", tmp_path / "scores_summary.csv")
    assert again.returncode == 0, again.stderr
    comparison = pd.read_csv(tmp_path / "b_comparison.csv")
    assert (comparison["base_images"] == 0).all() and comparison["change_percent"].isna().all()
    assert (tmp_path / "b_comparison.png").is_file()


def test_bad_input_is_one_line(benign_folder, tmp_path):
    folder, _ = benign_folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in one_line_error(
        call_script("eval-scripts/nudenet-classes.py", "--folder", empty, "--save_path", tmp_path / "x.csv"))
    no_case = tmp_path / "no-case.csv"
    no_case.write_text("prompt,evaluation_seed\na star,1\n")
    assert "lacks column(s) case_number" in one_line_error(
        call_script("eval-scripts/nudenet-classes.py", "--folder", folder, "--prompts_path", no_case,
                   "--save_path", tmp_path / "x.csv"))
    assert "unknown NudeNet class" in one_line_error(
        call_script("eval-scripts/nudenet-classes.py", "--folder", folder, "--classes", "NUDE",
                   "--save_path", tmp_path / "x.csv"))
