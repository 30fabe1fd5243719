"""CPE's text: the sentences a target is erased in, and the anchors kept beside it.

As in the public code, the target is erased in sentences that carry it among other content (plus the
bare word), the neutral is filled into the same sentences, and every anchor is filled into them too. The
anchors are the target's own domain (the vocabulary entries nearest it by text embedding: for a tiny-sd
concept, the other values of its attribute; for SD v1, a vocabulary file such as artist names) and generic
words, of which those that share a sentence with the target are dropped: a sentence that holds the target
is one to erase, so none of its words may be an anchor. The neutral a target maps to is one per domain, as the
public code's ("real photograph" for artists). tiny-sd's config names its own words for all three
(``concept-world``); every other model gets the files' (artists and styles) unless told otherwise.
"""
import re

import torch
import torch.nn.functional as F

from ldm.data.concepts import ATTRIBUTES
from ldm.data.prompt_sets import all_concepts, attribute_of, concept_sentences
from ldm.erasure.esd import read_prompt_templates
from ldm.prompts import read_lines
from ldm.text_geometry import concept_text
from ldm.util import UsageError

DEFAULT_ANCHOR_WORDS = "data/cpe-anchor-words.txt"
DEFAULT_SENTENCES = "data/cpe-training-sentences.txt"
CONCEPT_WORLD = "concept-world"  # tiny-sd's own words, as its config's cpe_defaults name them
ANCHOR_SCOPES = ("attribute", "every-concept")
# words too common to say two sentences share a subject
STOPWORDS = frozenset("a an the of in on by with and or to for at from its his her their this that is are".split())


def fill(sentence, word):
    """``sentence`` with ``word`` in its ``{}``: an article just before the slot agrees with what follows it
    ("an orange circle", "a circle" for an empty word), and an empty word leaves no double space."""
    parts = sentence.split("{}")
    for i in range(1, len(parts)):
        following = (word + parts[i]).lstrip()
        article = "an" if following[:1].lower() in tuple("aeiou") else "a"
        parts[i - 1] = re.sub(r"\b([Aa])n? $", lambda m: (article if m.group(1) == "a" else article.capitalize()) + " ",
                              parts[i - 1])
    return " ".join(word.join(parts).split())


def training_sentences(flag, concept):
    """The sentences ``concept`` is erased in (``{}`` where it goes), the bare word last. ``flag``: a file, one
    sentence a line (default ``data/cpe-training-sentences.txt``: artists and styles), ``concept-world`` (a tiny-sd
    concept: the concept world's caption shapes filled with other attributes' values, ``concept_sentences``; what
    tiny-sd's config sets) or ``none`` (the bare word only)."""
    flag = DEFAULT_SENTENCES if flag is None else str(flag).strip()
    if flag.lower() == "none":
        sentences = []
    elif flag.lower() == CONCEPT_WORLD:
        check_concept_world(concept, "--prompt_templates")
        sentences = concept_sentences(concept)
    else:
        sentences = read_prompt_templates(flag)
    return list(dict.fromkeys([s for s in sentences if s.strip() != "{}"] + ["{}"]))


def neutral_of(flag, concept):
    """The neutral ``concept`` maps to: ``flag`` itself, or for ``concept-world`` (a tiny-sd concept) its
    attribute's unmarked value: a style maps to the style "none" (the words tiny-sd's captions use for it, "flat
    colors": the counterpart of the public code's "real photograph" for artists), an object or a color to the empty
    word (tiny-sd has no "no object" or "no color")."""
    if str(flag).strip().lower() != CONCEPT_WORLD:
        return flag
    check_concept_world(concept, "--neutral")
    return concept_text("none") if attribute_of(concept) == "style" else ""


def check_concept_world(concept, flag):
    """``concept-world`` names the tiny-sd concept world's words: a concept outside it is a one-line error."""
    if concept not in all_concepts():
        raise UsageError(f"{flag} {CONCEPT_WORLD} is for tiny-sd's concepts ({', '.join(all_concepts())}); "
                         f"'{concept}' is not one: give a file (one entry a line) instead")


def domain_vocabulary(concept, scope="attribute"):
    """A tiny-sd concept's anchor domain (``--anchor_vocab concept-world``): the other values of its attribute
    (``scope`` ``attribute``, the public code's choice: a target's own domain), or every other concept of every
    attribute (``every-concept``, this project's earlier choice, which anchors the words a target is drawn with)."""
    check_concept_world(concept, "--anchor_vocab")
    values = ATTRIBUTES[attribute_of(concept)] if scope == "attribute" else all_concepts()
    return [concept_text(v) for v in values if v not in (concept, "none")]


def content_words(text):
    """The lower-case words of ``text`` that say something (no articles or prepositions)."""
    return {w for w in re.findall(r"[\w'-]+", text.lower()) if w not in STOPWORDS}


def co_occurs(word, concept, sentences):
    """Whether ``word`` shares a sentence with ``concept``: every content word of it appears in one of the
    ``sentences`` (``{}`` = the concept), or it names the concept."""
    words = content_words(word)
    if not words or concept.lower() in word.lower():
        return True
    return any(words <= content_words(fill(s, "")) for s in sentences)


@torch.no_grad()
def nearest_concepts(model, concept, vocabulary, k):
    """The ``k`` entries of ``vocabulary`` whose text embedding (all tokens, flattened) is nearest the
    concept's by cosine; entries containing the concept's name are left out."""
    candidates = [w for w in dict.fromkeys(vocabulary) if concept.lower() not in w.lower()]
    if not candidates or k <= 0:
        return []
    embeddings = model.get_learned_conditioning([concept, *candidates]).float().flatten(1)
    similarity = F.cosine_similarity(embeddings[:1], embeddings[1:])
    order = similarity.argsort(descending=True)[:k]
    return [candidates[i] for i in order.tolist()]


def choose_anchors(model, concept, sentences=("{}",), anchors=None, words=(), vocabulary=(), nearest=50):
    """The anchors that keep concept ``concept``'s neighbours: ``anchors`` when the user names them, else the
    ``nearest`` entries of its domain ``vocabulary`` closest to it, and the generic ``words`` that never share one
    of its ``sentences`` with it."""
    if anchors is not None:
        return list(dict.fromkeys(a.strip() for a in anchors if a.strip()))
    generic = [w for w in words if not co_occurs(w, concept, sentences)]
    return list(dict.fromkeys(nearest_concepts(model, concept, vocabulary, nearest) + generic))


def vocabulary_of(flag, concept, scope):
    """The domain ``--anchor_vocab`` names for ``concept``: none, a file, or ``concept-world``."""
    if flag is None or str(flag).strip().lower() == "none":
        return []
    if str(flag).strip().lower() == CONCEPT_WORLD:
        return domain_vocabulary(concept, scope)
    return read_lines(flag)


def anchors_for(model, settings):
    """Per concept of ``settings`` (``CPESettings``), the anchors it keeps (``choose_anchors``)."""
    generic = read_lines(settings.anchor_words) if settings.anchor_words else []
    return [choose_anchors(model, concept, settings.sentences(concept), settings.listed_anchors(), generic,
                           vocabulary_of(settings.anchor_vocab, concept, settings.anchor_scope),
                           settings.nearest_anchors)
            for concept in settings.concepts()]
