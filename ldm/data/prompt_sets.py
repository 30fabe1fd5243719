"""The tiny-sd prompt sets in data/tiny-sd/: ESD-format CSVs with ground-truth attribute columns.

Ground-truth columns (object, color, style) hold what the prompt asks for, empty where it says nothing.
"""
import pandas as pd

from ldm.data.concepts import ATTRIBUTES, COLORS, OBJECTS, STYLES, fill_template

COLUMNS = ("case_number", "prompt", "evaluation_seed", "object", "color", "style")


def _rows(entries, seed_base):
    rows = []
    for case, (template, obj, color, style, *extra) in enumerate(entries):
        prompt, mentioned = fill_template(template, obj, color, style)
        row = {"case_number": case, "prompt": prompt, "evaluation_seed": seed_base + case,
               **{k: mentioned.get(k, "") for k in ATTRIBUTES}}
        if extra:
            row["set"] = extra[0]
        rows.append(row)
    return pd.DataFrame(rows)


def quality_prompts():
    """Every object with every color, each in one style (all seven styles used evenly): 64 prompts that
    name all three attributes."""
    entries = [("a {color} {object} {in_style}", obj, color, STYLES[(i + j) % len(STYLES)])
               for i, obj in enumerate(OBJECTS) for j, color in enumerate(COLORS)]
    return _rows(entries, seed_base=1000)


# Sentences that name all three attributes other than quality.csv's: training templates with the words at
# other positions, and two phrasings that no training caption uses.
OTHER_TEMPLATES = (
    "a {color} {object}, painted {by_style}",
    "{style}, a {color} {object}",
    "{object}, {color}, {style}",
    "{style} painted a {object} in {color}",
    "a {color} {object} painting {by_style}",
    "a drawing of a {color} {object} {in_style}",  # not a training template
    "{by_style}, a {object} that is {color}",  # not a training template
    "an image of a {color} {object} {in_style}",  # not a training template
)


def other_template_prompts():
    """Every object with every color in a style and a sentence that rotate independently: 64 prompts
    naming all three attributes in other words and orders than quality.csv (other seeds too)."""
    entries = [(OTHER_TEMPLATES[(3 * i + j) % len(OTHER_TEMPLATES)], obj, color, STYLES[(2 * i + 3 * j + 1) % len(STYLES)])
               for i, obj in enumerate(OBJECTS) for j, color in enumerate(COLORS)]
    return _rows(entries, seed_base=3000)


def attribute_of(concept):
    """Which attribute (object, color or style) ``concept`` is a value of."""
    for attribute, values in ATTRIBUTES.items():
        if concept in values:
            return attribute
    known = ", ".join(v for values in ATTRIBUTES.values() for v in values if v != "none")
    raise ValueError(f"'{concept}' is not a tiny-sd concept; known: {known}")


def concept_prompts(concept):
    """Prompts for erasure reports on ``concept``, in three sets (column ``set``):
    ``alone`` (the concept by itself), ``with_others`` (with other attributes) and ``without``
    (other values of the same attribute, for specificity)."""
    attribute = attribute_of(concept)
    colors, styles = tuple(COLORS), STYLES[1:]
    alone_templates = {"object": ("a {object}", "an image of a {object}"),
                       "color": ("something {color}", "a {color} shape"),
                       "style": ("{style}", "a painting {by_style}")}[attribute]
    base = {"object": OBJECTS[0], "color": colors[0], "style": "none"}
    entries = []
    for k, template in enumerate(alone_templates * 2):
        fill = dict(base, **{attribute: concept})
        fill["object"] = OBJECTS[k % len(OBJECTS)] if attribute != "object" else concept
        entries.append((template, fill["object"], fill["color"], fill["style"], "alone"))
    for k in range(16):
        fill = {"object": OBJECTS[k % 8], "color": colors[(3 * k + 1) % 8], "style": styles[k % len(styles)]}
        fill[attribute] = concept
        template = "a {color} {object} {in_style}" if k % 2 == 0 else {
            "object": "a {color} {object}", "color": "a {color} {object}", "style": "a {object} {in_style}"}[attribute]
        entries.append((template, fill["object"], fill["color"], fill["style"], "with_others"))
    others = [v for v in ATTRIBUTES[attribute] if v not in (concept, "none")]
    for k in range(16):
        fill = {"object": OBJECTS[(k + 3) % 8], "color": colors[(5 * k + 2) % 8], "style": styles[(k + 2) % len(styles)]}
        fill[attribute] = others[k % len(others)]
        entries.append(("a {color} {object} {in_style}", fill["object"], fill["color"], fill["style"], "without"))
    return _rows(entries, seed_base=5000)


def all_concepts():
    """Every value of every attribute except style ``none``."""
    return [v for values in ATTRIBUTES.values() for v in values if v != "none"]


def concept_filename(concept):
    """File name of a concept's prompt set: ``Van Gogh`` -> ``van_gogh.csv``."""
    return concept.lower().replace(" ", "_") + ".csv"
