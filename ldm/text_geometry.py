"""The text side of a model as erasure methods see it: null spaces of stacked text embeddings (what
SepCE builds on) and how consistently a concept word moves the context across sentences (what lets an
erasure trained on the bare name reach composed prompts)."""
import numpy as np
import pandas as pd
import torch

from ldm.data.concepts import ATTRIBUTES, OBJECTS, STYLES, TEMPLATES, fill_template, style_phrases
from ldm.data.prompt_sets import attribute_of

NULL_SPACE_RTOL = 1e-6  # tiny-sd: the rank has settled by 1e-6 (same at 1e-7, 1e-8); 1e-5 counts a live direction as null


def concept_text(value):
    """How a prompt names a tiny-sd value on its own (style ``none`` is "flat colors")."""
    return style_phrases(value)[0] if value in STYLES else value


def protected_prompts(concept):
    """tiny-sd's default protected set for ``concept``: the empty prompt and every other value of its
    attribute, each as a prompt."""
    return [""] + [concept_text(v) for v in ATTRIBUTES[attribute_of(concept)] if v != concept]


@torch.no_grad()
def stacked_embeddings(model, prompts):
    """The text contexts of ``prompts``, every token of each, stacked: (len(prompts) * tokens, width)."""
    context = model.get_learned_conditioning(list(prompts)).float()
    return context.reshape(-1, context.shape[-1])


def null_space(matrix, rtol=NULL_SPACE_RTOL):
    """Orthonormal basis (width, k) of the null space of ``matrix`` (rows, width), by SVD: singular
    directions whose singular value is below ``rtol`` times the largest count as null."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=True)
    rank = int((singular > rtol * singular.max()).sum()) if singular.numel() else 0
    return vh[rank:].T


def composed_templates(attribute):
    """The caption templates that name ``attribute`` together with at least one other attribute."""
    keys = {"object": "{object}", "color": "{color}", "style": "style}"}
    return [t for t in TEMPLATES if keys[attribute] in t and sum(keys[a] in t for a in keys) >= 2]


@torch.no_grad()
def direction_consistency(model, concept):
    """Per composed template: the cosine between the direction the concept moves the mean-pooled context
    in its bare name and inside the template (each direction: the context with the concept minus the
    context with another value of its attribute, averaged over those values). 1 means the concept is
    one word whatever the sentence; near 0 means it is a different direction in every sentence."""
    attribute = attribute_of(concept)
    others = [v for v in ATTRIBUTES[attribute] if v != concept]

    def pooled(prompts):
        return model.get_learned_conditioning(list(prompts)).float().mean(dim=1)

    bare = pooled([concept_text(concept)] * len(others)) - pooled([concept_text(v) for v in others])
    rows = []
    for template in composed_templates(attribute):
        filler = {"object": OBJECTS[3], "color": "blue", "style": STYLES[2]}
        filler = {k: (v if v != concept else ATTRIBUTES[k][0]) for k, v in filler.items()}

        def fill(value):
            values = {**filler, attribute: value}
            return fill_template(template, values["object"], values["color"], values["style"])[0]

        composed = pooled([fill(concept)] * len(others)) - pooled([fill(v) for v in others])
        cosine = torch.nn.functional.cosine_similarity(bare.mean(0), composed.mean(0), dim=0)
        rows.append({"concept": concept, "template": template, "example": fill(concept), "cosine": float(cosine)})
    return pd.DataFrame(rows)


def text_side_report(model, concepts, rtol=NULL_SPACE_RTOL):
    """Per concept: the text width, the null-space dimension of its protected set's embeddings, and the
    mean and minimum direction consistency over composed templates."""
    rows = []
    for concept in concepts:
        embeddings = stacked_embeddings(model, protected_prompts(concept))
        consistency = direction_consistency(model, concept)["cosine"]
        rows.append({"concept": concept, "width": embeddings.shape[1], "protected_prompts": len(protected_prompts(concept)),
                     "null_space_dim": null_space(embeddings, rtol).shape[1],
                     "direction_cosine_mean": float(consistency.mean()),
                     "direction_cosine_min": float(np.min(consistency))})
    return pd.DataFrame(rows)
