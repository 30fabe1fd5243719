"""Write the tiny-sd prompt CSVs (quality.csv, quality-other-templates.csv and concepts/<concept>.csv)
from ldm.data.prompt_sets.

    python data/tiny-sd/make-prompts.py
"""
from pathlib import Path

from ldm.data.prompt_sets import (all_concepts, concept_filename, concept_prompts, other_template_prompts,
                                  quality_prompts)

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    quality_prompts().to_csv(HERE / "quality.csv", index=False)
    other_template_prompts().to_csv(HERE / "quality-other-templates.csv", index=False)
    (HERE / "concepts").mkdir(exist_ok=True)
    for concept in all_concepts():
        concept_prompts(concept).to_csv(HERE / "concepts" / concept_filename(concept), index=False)
    print(f"wrote quality.csv, quality-other-templates.csv and {len(all_concepts())} concept sets to {HERE}")
