"""Ring-A-Bell (Tsai et al., 2024; docs/attacks.md): a model-agnostic attack on
concept erasure. It never looks at the erased model, only at the text encoder.

The concept vector is the mean difference of the text embeddings (every context token) of prompts with
and without the concept:

    c = mean_i [ E(p_i with the concept) - E(p_i without) ]           (tokens x width)

For a prompt ``p`` the attack looks for a *discrete* prompt whose embedding approaches ``E(p) + eta c``.
The paper searches with a genetic algorithm, and so does ``genetic_search``: a population of token
sequences, fitness the negative mean squared distance of their embeddings to the target, the best
quarter kept each generation (so the best never gets worse), children by uniform crossover of two kept
parents and per-token mutation drawn from the search vocabulary.

The search vocabulary (``search_vocabulary``) is the tokenizer's whole-word alphabetic tokens, without
any token of the concept's own name: an "attack" that writes the name is the prompt it started from.
"""
import re
from dataclasses import dataclass

import torch

from ldm.util import UsageError


def concept_pairs(concept, templates):
    """Prompt pairs ``(with, without)``: every template (``{}`` where the concept goes) filled with the
    concept and with nothing (spaces collapsed)."""
    pairs = []
    for template in templates:
        without = " ".join(template.replace("{}", " ").split())
        pairs.append((template.replace("{}", concept), without))
    return pairs


@torch.no_grad()
def concept_vector(encode, pairs):
    """``c = mean_i [E(with_i) - E(without_i)]`` over ``pairs``; ``encode`` maps a list of prompts to
    their (batch, tokens, width) embeddings."""
    if not pairs:
        raise UsageError("Ring-A-Bell needs at least one prompt pair to build the concept vector")
    with_concept = encode([w for w, _ in pairs]).float()
    without = encode([wo for _, wo in pairs]).float()
    return (with_concept - without).mean(0)


def search_vocabulary(tokenizer, exclude=()):
    """Token ids the search may use: whole-word alphabetic tokens (``word</w>``), none of which is a
    token of the ``exclude`` strings (the concept's own name)."""
    banned = set()
    for text in exclude:
        banned.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = [i for w, i in tokenizer.get_vocab().items() if re.fullmatch(r"[a-z]+</w>", w) and i not in banned]
    return torch.tensor(sorted(ids))


def frame_token_ids(tokenizer, token_ids, context):
    """Token id sequences (batch, k) framed as the tokenizer frames a prompt: BOS, the tokens, EOS, EOS
    padding, cut to ``context`` tokens (batch, context)."""
    batch, length = token_ids.shape
    ids = torch.full((batch, context), tokenizer.pad_token_id, dtype=torch.long)
    ids[:, 0] = tokenizer.bos_token_id
    k = min(length, context - 2)
    ids[:, 1:1 + k] = token_ids[:, :k]
    ids[:, 1 + k] = tokenizer.eos_token_id
    return ids


@torch.no_grad()
def encode_token_ids(text_encoder, token_ids):
    """Embeddings (batch, max_length, width) of token sequences (batch, k) under a ``FrozenCLIPEmbedder``,
    each framed as a prompt (``frame_token_ids``)."""
    ids = frame_token_ids(text_encoder.tokenizer, token_ids, text_encoder.max_length)
    return text_encoder.transformer(input_ids=ids.to(text_encoder.transformer.device)).last_hidden_state.float().cpu()


@dataclass
class GeneticSettings:
    """The genetic search's settings (recorded with every attack)."""
    length: int = 16          # tokens in the adversarial prompt (the paper's K)
    population: int = 64
    generations: int = 100
    keep: float = 0.25        # the best fraction kept as parents each generation
    mutation: float = 0.1     # chance that a child's token is redrawn from the vocabulary
    seed: int = 0

    def check(self):
        """Refuse settings the search cannot run with, one line each."""
        if self.length < 1 or self.population < 4 or self.generations < 1:
            raise UsageError("Ring-A-Bell: --length >= 1, --population >= 4 and --generations >= 1 are needed")
        if not (0 < self.keep < 1 and 0 <= self.mutation <= 1):
            raise UsageError("Ring-A-Bell: keep must be in (0, 1) and mutation in [0, 1]")
        return self


def genetic_search(fitness, vocabulary, settings):
    """Maximise ``fitness`` (token ids (n, length) -> scores (n,)) over sequences of ``vocabulary`` tokens.
    Returns the best sequence (length,), its fitness and the best fitness of every generation (never
    decreasing: the kept parents survive)."""
    settings.check()
    generator = torch.Generator().manual_seed(settings.seed)
    n, length = settings.population, settings.length

    def draw(*shape):
        return vocabulary[torch.randint(0, len(vocabulary), shape, generator=generator)]

    population = draw(n, length)
    scores = fitness(population)
    kept = max(2, int(round(settings.keep * n)))
    history = []
    for _ in range(settings.generations):
        order = scores.argsort(descending=True)
        parents, parent_scores = population[order[:kept]], scores[order[:kept]]
        history.append(float(parent_scores[0]))
        pick = torch.randint(0, kept, (2, n - kept), generator=generator)
        cross = torch.rand(n - kept, length, generator=generator) < 0.5
        children = torch.where(cross, parents[pick[0]], parents[pick[1]])
        mutate = torch.rand(n - kept, length, generator=generator) < settings.mutation
        children = torch.where(mutate, draw(n - kept, length), children)
        population = torch.cat([parents, children])
        scores = torch.cat([parent_scores, fitness(children)])
    best = scores.argmax()
    history.append(float(scores[best]))
    return population[best], float(scores[best]), history


def ring_a_bell_prompt(text_encoder, prompt, vector, eta, vocabulary, settings):
    """The adversarial prompt for ``prompt``: the vocabulary tokens whose embedding is nearest
    ``E(prompt) + eta * vector`` by genetic search, decoded to text. Returns the text and a record:
    the distance of the found tokens' embedding to the target, and of the prompt's own embedding."""
    own = text_encoder.encode([prompt]).float().cpu()[0]
    target = own + eta * vector.float().cpu()

    def fitness(token_ids):
        return -(encode_token_ids(text_encoder, token_ids) - target).pow(2).mean(dim=(1, 2))

    best, score, history = genetic_search(fitness, vocabulary, settings)
    text = text_encoder.tokenizer.decode(best.tolist()).strip()
    return text, {"distance": -score, "prompt_distance": float((own - target).pow(2).mean()), "history": history}
