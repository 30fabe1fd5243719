"""The tiny-sd prompt sets in data/tiny-sd/: ESD-format CSVs with ground-truth attribute columns.

Ground-truth columns (object, color, style) hold what the prompt asks for, empty where it says nothing.
"""
import numpy as np
import pandas as pd

from ldm.data.concepts import ATTRIBUTES, COLORS, OBJECTS, STYLES, TEMPLATES, fill_template

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


WITHOUT_PROMPTS = 48  # 6 to 10 prompts per value of every attribute in the specificity set


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
    # every value of the other attributes equally often, paired at random (seeded): a value is not measured
    # on one prompt alone, and no value always comes with the same partner
    rng = np.random.default_rng(0)
    spread = {k: rng.permutation(np.resize(values, WITHOUT_PROMPTS))
              for k, values in (("object", OBJECTS), ("color", colors), ("style", styles))}
    for k in range(WITHOUT_PROMPTS):
        fill = {name: str(values[k]) for name, values in spread.items()}
        fill[attribute] = others[k % len(others)]
        entries.append(("a {color} {object} {in_style}", fill["object"], fill["color"], fill["style"], "without"))
    return _rows(entries, seed_base=5000)


# A sentence for every combination of named attributes (the "a {color} shape" and "a painting by"
# phrasings are the alone sets' own, for prompts that name no object).
_PHRASINGS = {
    frozenset({"object", "color", "style"}): "a {color} {object} {in_style}",
    frozenset({"object", "color"}): "a {color} {object}",
    frozenset({"object", "style"}): "a {object} {in_style}",
    frozenset({"color", "style"}): "a {color} shape {in_style}",
    frozenset({"object"}): "a {object}",
    frozenset({"color"}): "a {color} shape",
    frozenset({"style"}): "a painting {by_style}",
}
ATTRIBUTE_ERASURE_SETS = ("from", "from_named", "elsewhere", "elsewhere_named")


def attribute_erasure_prompts(concept, erase_from, per_set=8):
    """Prompts for reporting ``--prompt concept --erase_from erase_from`` (erase A only where it appears
    with B, e.g. a style from one object), in four sets of ``per_set`` prompts (column ``set``):

    - ``from``: B without A's attribute named (the model chooses it, as "cowboy" chooses a hat);
    - ``from_named``: B with A named;
    - ``elsewhere``: other values of B's attribute, A's attribute not named;
    - ``elsewhere_named``: other values of B's attribute with A named.

    The third attribute is named in every other prompt, its values rotating.
    """
    a_attribute, b_attribute = attribute_of(concept), attribute_of(erase_from)
    if a_attribute == b_attribute:
        raise ValueError(f"'{concept}' and '{erase_from}' are both {a_attribute} values; attribute erasure "
                         "removes a concept from a concept of another attribute")
    third = next(k for k in ATTRIBUTES if k not in (a_attribute, b_attribute))
    third_values = [v for v in ATTRIBUTES[third] if v != "none"]
    b_others = [v for v in ATTRIBUTES[b_attribute] if v not in (erase_from, "none")]
    defaults = {"object": OBJECTS[0], "color": tuple(COLORS)[0], "style": "none"}
    entries = []
    for set_index, name in enumerate(ATTRIBUTE_ERASURE_SETS):
        for k in range(per_set):
            fill = dict(defaults, **{third: third_values[(3 * (k // 2) + 2 * set_index) % len(third_values)]})
            fill[b_attribute] = erase_from if name.startswith("from") else b_others[k % len(b_others)]
            named = {b_attribute} | ({third} if k % 2 else set())
            if name.endswith("named"):
                fill[a_attribute] = concept
                named.add(a_attribute)
            entries.append((_PHRASINGS[frozenset(named)], fill["object"], fill["color"], fill["style"], name))
    return _rows(entries, seed_base=7000)


def concept_sentences(concept, fills=4):
    """Sentences that carry ``concept`` among other content, ``{}`` where it goes: every caption shape of
    the concept world (``TEMPLATES``, the shapes the prompt sets use) that names the concept's attribute,
    each filled ``fills`` times with other attributes' values (rotating, so every value appears)."""
    attribute = attribute_of(concept)
    slot = {"object": "{}", "color": "{}", "style": "{}"}
    others = {k: list(v) for k, v in ATTRIBUTES.items() if k != attribute}
    sentences = []
    for i, template in enumerate(t for t in TEMPLATES if ("{%s}" % attribute if attribute != "style" else "style}") in t):
        for k in range(fills):
            fill = {name: values[(i + k * (2 + j)) % len(values)] for j, (name, values) in enumerate(others.items())}
            fill[attribute] = slot[attribute]
            sentences.append(fill_template(template, fill["object"], fill["color"], fill["style"])[0])
    return list(dict.fromkeys(sentences))


def all_concepts():
    """Every value of every attribute except style ``none``."""
    return [v for values in ATTRIBUTES.values() for v in values if v != "none"]


def concept_filename(concept):
    """File name of a concept's prompt set: ``Van Gogh`` -> ``van_gogh.csv``."""
    return concept.lower().replace(" ", "_") + ".csv"
