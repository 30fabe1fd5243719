"""CPE: ResAG shapes and zero-init identity (tiny-sd and SD v1 structure, 77 x 768 contexts), gate selection
across concepts, one residual per prompt, training on projections only (no UNet), exact resume, the diffusers
adapter's parity with our ldm, restore, and one-line bad input."""
import pytest
import torch

from ldm.data.prompt_sets import concept_sentences
from ldm.erasure.cpe import CPESettings, CPETrainer
from ldm.erasure.cpe_geometry import lipschitz_weights
from ldm.erasure.cpe_prompts import (anchors_for, choose_anchors, co_occurs, domain_vocabulary, fill, neutral_of,
                                     training_sentences)
from ldm.erasure.cpe_gates import (ResAG, ResAGHooks, apply_resags, apply_resags_of, apply_to_diffusers, gate,
                                   gate_coordinates, gated_projections, read_resags, select_by_gate)
from ldm.loading import load_model
from ldm.paths import models_dir
from ldm.runs import restore_concept, save_term
from ldm.util import UsageError, load_config

from conftest import SESSION_DIR, TINY, call_script, one_line_error, sd_v1_structure_model

TEMPLATES = SESSION_DIR / "cpe-test-templates.txt"
TEMPLATES.write_text("{}\na photo of {}\n")


def new_resag(model, concept="Van Gogh", rank=1, gate_rank=16, trained=False, seed=0):
    """A ResAG for ``model``; ``trained`` fills B and v with random values so that it changes something."""
    layers = gated_projections(model.model.diffusion_model)
    width = next(iter(layers.values())).in_features
    generator = torch.Generator().manual_seed(seed)
    resag = ResAG.new(concept, layers, width, rank, gate_rank, 1.0, generator)
    if trained:
        for key, tensor in resag.tensors.items():
            if key == "v" or key.startswith("B."):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
            if key in ("U1", "U2"):
                tensor.mul_(width)
    return resag


def projections(model, prompts):
    """``{layer: to_k/to_v output}`` of ``prompts`` through the model's (possibly wrapped) projections."""
    context = model.get_learned_conditioning(prompts)
    with torch.no_grad():
        return {n: m(context) for n, m in gated_projections(model.model.diffusion_model).items()}


def settings(**changes):
    values = dict(prompt="Van Gogh", anchors="Seurat,a photo", neutral="", prompt_templates=str(TEMPLATES),
                  stages=2, iterations=3, first_stage_factor=2, adv_embeddings=2, anchor_batch=4, lr=1e-3)
    return CPESettings(**{**values, **changes})


def new_trainer(model, chosen):
    """A CPE trainer as the registry builds it: the anchors of each concept chosen from the settings."""
    anchors = anchors_for(model, chosen)
    assert anchors == [["Seurat", "a photo"]] * len(chosen.concepts()) or chosen.anchors is None
    return CPETrainer(model, chosen, anchors, progress=False)


def test_untrained_resag_changes_nothing_and_has_the_papers_shapes(tiny):
    base = projections(tiny, ["Van Gogh", ""])
    resag = new_resag(tiny)
    hooks = apply_resags(tiny, [resag])
    try:
        wrapped = projections(tiny, ["Van Gogh", ""])
        assert all(torch.equal(base[n], wrapped[n]) for n in base)
        assert resag.tensors["U1"].shape == resag.tensors["U2"].shape == (256, 16)
        assert resag.tensors["v"].shape == (256,)
        name = next(iter(hooks.layers))
        assert resag.tensors[f"A.{name}"].shape == (256, 1)
        assert resag.tensors[f"B.{name}"].shape == (1, hooks.layers[name].out_features)
    finally:
        hooks.remove()


def test_sd_v1_structure_shapes_identity_and_one_residual_per_prompt(tmp_path):
    from ldm.generate import generate_grid
    model = sd_v1_structure_model(tmp_path)
    layers = gated_projections(model.model.diffusion_model)
    assert len(layers) == 32 and all(m.in_features == 768 for m in layers.values())  # 16 attn2 x (to_k, to_v)
    context = model.get_learned_conditioning(["a photo of a dog"])
    assert tuple(context.shape[1:]) == (77, 768)
    resag = new_resag(model, rank=4, gate_rank=64)
    assert resag.tensors["U1"].shape == (768, 64)
    base = projections(model, ["a photo of a dog"])
    hooks = apply_resags(model, [resag])
    assert all(torch.equal(base[n], w) for n, w in projections(model, ["a photo of a dog"]).items())
    hooks.remove()
    hooks = apply_resags(model, [new_resag(model, trained=True)])
    moved = projections(model, ["a photo of a dog"])
    assert max((moved[n] - base[n]).abs().max() for n in base) > 1e-3
    hooks.computations = 0
    generate_grid(model, [["a photo of a dog"], ["a cat"]], seed=0, ddim_steps=4)
    assert hooks.computations == 1  # 4 steps, 32 layers, classifier-free guidance: one gate computation
    hooks.remove()


def test_each_token_takes_the_concept_with_the_highest_gate():
    gates = torch.tensor([[[0.9, 0.1, 0.5]], [[0.2, 0.8, 0.6]]])  # (concepts, batch, tokens)
    residuals = torch.stack([torch.full((1, 3, 2), 1.0), torch.full((1, 3, 2), 2.0)])
    chosen = select_by_gate(gates, residuals)
    assert chosen[0, :, 0].tolist() == [1.0, 2.0, 2.0]


def test_two_concepts_wrap_by_gate_and_each_alone_matches(tiny):
    a, b = new_resag(tiny, "Van Gogh", trained=True, seed=1), new_resag(tiny, "moon", trained=True, seed=2)
    context = tiny.get_learned_conditioning(["Van Gogh", "a red moon"])
    (ga, gate_a), (gb, gate_b) = a.gate(context), b.gate(context)
    name = next(iter(gated_projections(tiny.model.diffusion_model)))
    expected = torch.where((gate_a >= gate_b)[..., None], a.residual(ga, name), b.residual(gb, name))
    hooks = ResAGHooks(gated_projections(tiny.model.diffusion_model), [a, b])
    try:
        assert torch.allclose(hooks.residual_of(context)[name], expected, atol=1e-6)
        assert (gate_a > gate_b).any() and (gate_b > gate_a).any()  # both concepts are chosen somewhere
    finally:
        hooks.remove()


def test_summed_concepts_add_each_gated_residual_and_mixed_runs_are_refused(tiny, tmp_path):
    a, b = (new_resag(tiny, c, trained=True, seed=s) for c, s in (("Van Gogh", 1), ("moon", 2)))
    a.combination = b.combination = "sum"
    context = tiny.get_learned_conditioning(["Van Gogh", "a red moon"])
    name = next(iter(gated_projections(tiny.model.diffusion_model)))
    (ga, _), (gb, _) = a.gate(context), b.gate(context)
    hooks = ResAGHooks(gated_projections(tiny.model.diffusion_model), [a, b])
    try:
        assert torch.allclose(hooks.residual_of(context)[name], a.residual(ga, name) + b.residual(gb, name), atol=1e-6)
    finally:
        hooks.remove()
    save_term(tmp_path, a.concept, a.tensors, {"rank": 1, "gate_rank": 16, "alpha": 1.0, "gate_combination": "sum"})
    save_term(tmp_path, b.concept, b.tensors, {"rank": 1, "gate_rank": 16, "alpha": 1.0})  # written before the setting
    assert sorted(r.combination for r in read_resags(tmp_path)) == ["highest-gate", "sum"]
    with pytest.raises(UsageError, match="combine differently.*--gate_combination"):
        apply_resags_of(tiny, tmp_path)


def test_training_uses_projections_only_trains_u2_and_keeps_anchors(tiny):
    unet_calls = []
    handle = tiny.model.diffusion_model.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    try:
        trainer = new_trainer(tiny, settings(adv_embeddings=0, stages=1, iterations=20, first_stage_factor=1,
                                             anchor_weight=1e4))
        start = {k: v.detach().clone() for k, v in trainer.params.items()}
        for _ in range(20):
            trainer.step()
    finally:
        handle.remove()
    assert not unet_calls  # no UNet forward in training
    assert not torch.equal(start["0.U2"], trainer.params["0.U2"])  # K = E U2 (the public code never trains U2)
    assert not torch.equal(start["0.B"], trainer.params["0.B"])  # the residual trains
    model = trainer.edited_model()
    name = next(iter(trainer.layers))
    after = projections(model, ["Van Gogh", "Seurat"])
    with trainer.without_edit():
        before = projections(model, ["Van Gogh", "Seurat"])
    moved = (after[name][0] - before[name][0]).norm()
    kept = (after[name][1] - before[name][1]).norm()
    assert moved > 3 * kept, (moved, kept)


def test_resume_gives_the_same_resags_across_an_adversarial_stage(tiny):
    whole = new_trainer(tiny, settings())
    for _ in range(9):  # stage 0: 6 iterations, then adversarial embeddings, then stage 1: 3
        whole.step()
    part = new_trainer(tiny, settings())
    for _ in range(7):
        part.step()
    state = part.state_dict()
    resumed = new_trainer(tiny, settings())
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step()
    assert len(whole.deltas[0]) == 2
    assert all(torch.equal(whole.params[k], resumed.params[k]) for k in whole.params)


def test_settings_refuse_bad_input():
    with pytest.raises(UsageError, match="include 'van gogh' itself"):
        settings(anchors="Seurat,van gogh").check()
    with pytest.raises(UsageError, match="must be >= 1"):
        settings(rank=0).check()
    with pytest.raises(UsageError, match="must be >= 1"):
        settings(gate_rank=0).check()
    with pytest.raises(UsageError, match="names a concept twice"):
        settings(prompt="moon,Van Gogh,moon", seperator=",").check()
    assert settings(prompt="moon; Van Gogh", seperator=";").concepts() == ["moon", "Van Gogh"]


def test_default_anchors_are_the_targets_domain_and_generic_words_it_never_shares_a_sentence_with(tiny):
    sentences = training_sentences("concept-world", "orange")
    words = ["a photo", "a shape", "art by orange", "a dog"]
    colors = ["red", "yellow", "green", "cyan", "blue", "purple", "pink"]
    anchors = choose_anchors(tiny, "orange", sentences, words=words, vocabulary=domain_vocabulary("orange"))
    # the other colors (the target's own domain), then the generic words: "a shape" shares "an orange shape ..."
    assert sorted(anchors[:7]) == sorted(colors) and anchors[7:] == ["a photo", "a dog"]
    everything = domain_vocabulary("orange", "every-concept")
    assert len(everything) == 21 and "moon" in everything and "Van Gogh" in everything
    assert choose_anchors(tiny, "orange", sentences, words=words, vocabulary=colors, nearest=2)[2:] == ["a photo", "a dog"]
    assert choose_anchors(tiny, "Van Gogh", anchors=["x", " y ", "x"]) == ["x", "y"]
    # outside tiny-sd, the domain is a vocabulary file (e.g. artist names): its nearest entries
    assert choose_anchors(tiny, "Van Gogh", vocabulary=["Seurat", "Van Gogh's", "Hokusai"], nearest=1) in (["Seurat"], ["Hokusai"])
    with pytest.raises(UsageError, match="concept-world is for tiny-sd's concepts"):
        domain_vocabulary("a cowboy hat")


def test_tiny_sds_config_names_its_own_words_and_other_models_get_the_artist_files(tiny):
    """tiny-sd's config sets concept-world for sentences and anchors; the paper defaults (SD v1) are the files,
    whatever the concept's name."""
    blocks = load_config(TINY / "config.yaml").cpe_defaults
    assert (blocks.prompt_templates, blocks.anchor_vocab, blocks.neutral) == ("concept-world",) * 3
    paper = CPESettings(prompt="Van Gogh")
    assert paper.sentences("Van Gogh")[0] == "Image in the style of {}" and len(paper.sentences("Van Gogh")) == 41
    assert anchors_for(tiny, paper)[0][0] == "a photo"  # generic words only, no domain without a vocabulary
    chosen = anchors_for(tiny, CPESettings(prompt="Van Gogh", prompt_templates="concept-world",
                                           anchor_vocab="concept-world"))[0]
    assert sorted(chosen[:5]) == ["Hokusai", "Mondrian", "Pollock", "Rothko", "Seurat"] and "a painting" not in chosen


def test_the_neutral_is_one_per_domain(tiny):
    """concept-world: a style maps to the style none ("flat colors"), an object or a color to the empty word; any
    other value is the neutral itself. Each concept of a run is trained toward its own, and the run records them."""
    assert [neutral_of("concept-world", c) for c in ("Hokusai", "moon", "orange")] == ["flat colors", "", ""]
    assert neutral_of("real photograph", "Hokusai") == "real photograph"
    with pytest.raises(UsageError, match="--neutral concept-world is for tiny-sd's concepts"):
        CPESettings(prompt="a cowboy hat", neutral="concept-world", prompt_templates="none").check()
    settings = CPESettings(prompt="Pollock,star", seperator=",", neutral="concept-world", prompt_templates="none",
                           anchors="Seurat", stages=1, iterations=1).check()
    trainer = CPETrainer(tiny, settings, anchors_for(tiny, settings), progress=False)
    assert trainer.record()["neutrals"] == ["flat colors", ""]
    _, neutral = trainer.target_and_neutral(0)
    assert torch.equal(neutral[0], tiny.get_learned_conditioning(["flat colors"]).float()[0])


@pytest.mark.parametrize("concept", ["moon", "orange", "Hokusai"])
def test_training_sentences_carry_the_concept_among_other_attributes(concept):
    sentences = training_sentences("concept-world", concept)
    assert sentences[-1] == "{}" and all("{}" in s for s in sentences) and len(sentences) >= 40
    assert sentences[:-1] == [s for s in concept_sentences(concept) if s != "{}"]
    others = {"moon": "color", "orange": "object", "Hokusai": "object"}[concept]
    from ldm.data.concepts import ATTRIBUTES
    named = {v for v in ATTRIBUTES[others] if any(v in s for s in sentences)}
    assert named == set(ATTRIBUTES[others]) - {"none"}  # every value of another attribute appears
    assert training_sentences("none", concept) == ["{}"]
    with pytest.raises(UsageError, match="'a cowboy hat' is not one"):
        training_sentences("concept-world", "a cowboy hat")


def test_fill_makes_articles_agree_and_leaves_no_double_space():
    assert fill("a {} circle", "orange") == "an orange circle"
    assert fill("an image of a {}", "moon") == "an image of a moon"
    assert fill("a red {} in the style of Seurat", "") == "a red in the style of Seurat"
    assert fill("a {} circle", "") == "a circle"
    assert co_occurs("a shape", "orange", ["an {} shape"]) and not co_occurs("a dog", "orange", ["an {} shape"])


@pytest.mark.parametrize("rank", [1, 3])
def test_text_space_loss_equals_the_per_layer_error_of_the_projections(tiny, rank):
    """CPE's loss as a quadratic form in Gram matrices equals the Lipschitz-weighted squared error of every
    wrapped layer's output computed directly, for a residual and for a text-space part."""
    trainer = new_trainer(tiny, settings(rank=rank))
    resag = trainer.resags[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in resag.tensors.items():
            if key.startswith("B.") or key == "v":
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    E = trainer.encode(["a red moon", "a blue circle in the style of Seurat"])
    y = torch.randn(E.shape, generator=generator)
    gated, _ = resag.gate(E)
    packed = trainer.packed[0]
    K, J = trainer.geometry.coupling(packed["B"], resag.scale)
    z = trainer.coordinates(packed, E)
    A = packed["A"]
    assert torch.allclose(z, gated @ A, atol=1e-6)  # the gate's coordinates without forming Ebar
    weights = lipschitz_weights(trainer.unet, trainer.layers, trainer.tokens)

    def direct(text_part):
        return sum(weights[n] * ((torch.nn.functional.linear(text_part, layer.weight) if text_part is not None else 0)
                                 + resag.residual(gated, n)).pow(2).mean()
                   for n, layer in trainer.layers.items()) / len(trainer.layers)

    geometry = trainer.geometry
    assert torch.allclose(geometry.error(y, gated @ A, K, J), direct(y), rtol=1e-5)
    assert torch.allclose(geometry.error(None, gated @ A, K, J), direct(None), rtol=1e-5)
    d = torch.randn(E.shape, generator=generator)
    shifted = geometry.quadratic(y) + 2 * ((y @ geometry.G) * d).sum(-1) + geometry.quadratic(d)
    assert torch.allclose(geometry.error(y + d, gated @ A, K, J, shifted), direct(y + d), rtol=1e-4)


def test_gate_temperature_and_floor_are_saved_and_old_runs_load_with_theirs(tiny, tmp_path):
    import math
    resag = new_resag(tiny, trained=True)
    save_term(tmp_path / "old", resag.concept, resag.tensors, {"rank": 1, "gate_rank": 16, "alpha": 1.0})
    save_term(tmp_path / "new", resag.concept, resag.tensors, {"rank": 1, "gate_rank": 16, "alpha": 1.0,
                                                                "gate_temperature": 1.0, "gate_floor": 0.5})
    (old,), (new,) = read_resags(tmp_path / "old"), read_resags(tmp_path / "new")
    assert old.temperature == math.sqrt(16) and old.floor == 0.0  # how runs before the setting were trained
    assert new.temperature == 1.0 and new.floor == 0.5
    E = tiny.get_learned_conditioning(["Van Gogh", "a red moon"])
    _, g = new.gate(E)
    _, unfloored = ResAG(new.concept, new.tensors, 1, 16, 1.0, 1.0, 0.0).gate(E)
    assert torch.equal(g, torch.where(unfloored >= 0.5, unfloored, torch.zeros_like(unfloored)))
    assert (g == 0).any() and (g > 0).any()


def test_a_floored_gate_trains_through_the_floor():
    """Training's gate (``gate_coordinates``) gives ``gate``'s values, floor included, but the gradient of the
    unfloored gate: gates all below the floor still learn (a hard floor would leave them shut for good)."""
    generator = torch.Generator().manual_seed(0)
    E, U1, U2, A = (torch.randn(*shape, generator=generator) for shape in ((2, 5, 8), (8, 4), (8, 4), (8, 3)))
    v = torch.full((8,), -0.1).requires_grad_(True)
    z, g = gate_coordinates(E, U1, U2, v, A, floor=0.99)
    gated, hard = gate(E, U1, U2, v, floor=0.99)
    assert torch.equal(g, hard) and (g == 0).all() and torch.allclose(z, gated @ A)
    z.sum().backward()
    assert v.grad.abs().sum() > 0  # nothing passes the shut gates forward, yet the gradient reaches v


def test_diffusers_adapter_matches_our_ldm(tiny, tmp_path):
    """The same ResAG on a converted StableDiffusionPipeline and on our ldm: the same latents within 1e-4."""
    from omegaconf import OmegaConf

    from ldm.convert import to_diffusers_pipeline
    resag = new_resag(tiny, trained=True, seed=3)
    save_term(tmp_path, resag.concept, resag.tensors, {"rank": 1, "gate_rank": 16, "alpha": 1.0})
    pipe = to_diffusers_pipeline(tiny, OmegaConf.load(TINY / "config.yaml"))
    context = tiny.get_learned_conditioning(["a red moon in the style of Van Gogh"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=context).sample
        theirs_hooks = apply_to_diffusers(pipe, tmp_path)
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
        ours_hooks = apply_resags(tiny, read_resags(tmp_path))
        ours = tiny.apply_model(x, t, context)
    theirs_hooks.remove(), ours_hooks.remove()
    assert (theirs - base).abs().max() > 1e-3  # the ResAG changes the prediction
    assert (ours - theirs).abs().max() <= 1e-4


def test_a_resag_of_another_text_width_is_one_line(tiny, tmp_path):
    resag = new_resag(tiny)
    resag.tensors["U1"] = torch.zeros(768, 16)
    save_term(tmp_path, resag.concept, resag.tensors, {"rank": 1, "gate_rank": 16, "alpha": 1.0})
    with pytest.raises(UsageError, match="768-wide text encoder; this model's is 256-wide"):
        apply_resags_of(tiny, tmp_path)


FAST = ["--iterations", 2, "--stages", 2, "--first_stage_factor", 1, "--adv_embeddings", 2, "--devices", "cpu",
        "--no_diffusers", "--no_samples"]


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_train_two_concepts_restore_one_then_the_last_gives_the_base(run_name):
    two, one, none = (f"{run_name}-{x}" for x in ("two", "one", "none"))
    done = call_script("train-scripts/train-cpe.py", "--prompt", "Van Gogh,moon", "--seperator", ",", *FAST,
                       "--run_name", two)
    assert done.returncode == 0, done.stderr
    assert [r.concept for r in read_resags(models_dir() / two)] == ["moon", "Van Gogh"]
    loaded = load_model(two)
    assert loaded.method.name == "cpe" and loaded.model.resag_hooks is not None
    done = call_script("train-scripts/restore-concept.py", "--model_name", two, "--concept", "moon", "--run_name", one)
    assert done.returncode == 0, done.stderr
    assert [r.concept for r in read_resags(models_dir() / one)] == ["Van Gogh"]
    assert load_model(one).model.resag_hooks is not None
    done = call_script("train-scripts/restore-concept.py", "--model_name", one, "--concept", "Van Gogh",
                       "--run_name", none)
    assert done.returncode == 0, done.stderr
    restored = load_model(none).model
    assert getattr(restored, "resag_hooks", None) is None
    base = load_model("tiny-sd").model
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), base.state_dict().values()))


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_a_restored_run_is_the_single_run_of_the_first_concept_and_a_gate_floor_makes_it_exact(run_name):
    """Restoring the second concept of a two-concept run leaves exactly the one-concept run of the first (same
    start, same draws); its gate is small but not zero on the restored concept's prompts, and ``--gate_floor``
    zeroes it there (tiny-sd's config sets a floor: these runs turn it off)."""
    from safetensors.torch import load_file
    single, two = f"{run_name}-single", f"{run_name}-two"
    for name, prompt in ((single, "Van Gogh"), (two, "Van Gogh,moon")):
        done = call_script("train-scripts/train-cpe.py", "--prompt", prompt, "--seperator", ",", *FAST,
                           "--gate_floor", "0", "--run_name", name)
        assert done.returncode == 0, done.stderr
    done = call_script("train-scripts/restore-concept.py", "--model_name", two, "--concept", "moon", "--run_name",
                       f"{two}-restored")
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (models_dir() / single).glob("term-*.safetensors"))
    assert files == sorted(p.name for p in (models_dir() / f"{two}-restored").glob("term-*.safetensors"))
    for name in files:
        a, b = load_file(models_dir() / single / name), load_file(models_dir() / f"{two}-restored" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    base = projections(load_model("tiny-sd").model, ["a red moon"])
    restored = projections(load_model(f"{two}-restored").model, ["a red moon"])
    assert any(not torch.equal(base[n], restored[n]) for n in base)  # the gate is small, not zero
    floored = f"{run_name}-floored"
    done = call_script("train-scripts/train-cpe.py", "--prompt", "Van Gogh", *FAST, "--gate_floor", "0.9",
                       "--run_name", floored)
    assert done.returncode == 0, done.stderr
    assert read_resags(models_dir() / floored)[0].floor == 0.9
    after = projections(load_model(floored).model, ["a red moon"])  # a barely trained gate is about 0.5 everywhere
    assert all(torch.equal(base[n], after[n]) for n in base)


@pytest.mark.parametrize("flags,message", [
    (["--prompt", "Van Gogh", "--anchors", "Seurat,Van Gogh"], "itself"),
    (["--prompt", "Van Gogh", "--rank", "0"], "must be >= 1"),
    (["--prompt", "Van Gogh", "--gate_rank", "0"], "must be >= 1"),
    (["--prompt", "Van Gogh", "--anchor_vocab", "no/such/file.txt"], "does not exist"),
    (["--prompt", "Van Gogh", "--gate_floor", "1.5"], "--gate_floor must be in [0, 1)"),
    (["--prompt", "Van Gogh", "--gate_temperature", "0"], "must be a positive number"),
    (["--prompt", "Van Gogh", "--adv_iterations", "0"], "must be >= 1"),
    (["--prompt", "Van Gogh", "--anchor_scope", "everything"], "invalid choice"),
    (["--prompt", "Van Gogh", "--gate_combination", "mean"], "invalid choice"),
    (["--prompt", "Van Gogh", "--prompt_templates", "no/such/sentences.txt"], "does not exist"),
])
def test_bad_input_is_one_line(flags, message, run_name):
    line = one_line_error(call_script("train-scripts/train-cpe.py", *flags, "--run_name", run_name, "--devices", "cpu"))
    assert message in line, line
    assert not (models_dir() / run_name).exists()


def test_restoring_a_concept_not_in_the_run_is_one_line(tiny, tmp_path):
    resag = new_resag(tiny)
    run = tmp_path / "run"
    run.mkdir()
    save_term(run, resag.concept, resag.tensors, {"rank": 1, "gate_rank": 16, "alpha": 1.0})
    with pytest.raises(UsageError, match="not erased by run"):
        restore_concept(run, "moon", "new", root=tmp_path)


def test_preservation_table_sees_an_edit_made_by_hooks(tiny, new_tiny):
    # the table calls to_k/to_v rather than reading their weights, which a ResAG leaves as the base's
    from omegaconf import OmegaConf
    from ldm.erasure.report import preservation_table
    base = new_tiny()
    unwrapped = projections(tiny, ["Van Gogh"])
    hooks = apply_resags(tiny, [new_resag(tiny, trained=True)])
    try:
        table = preservation_table(base.eval(), tiny, ["Van Gogh"], seeds=[0], ddim_steps=2)
        wrapped = projections(tiny, ["Van Gogh"])
    finally:
        hooks.remove()
    moved = max((wrapped[n] - unwrapped[n]).abs().max().item() for n in wrapped)
    assert moved > 1e-4 and table.loc[0, "key_value_max_abs_diff"] == pytest.approx(moved, rel=1e-3)


def test_reach_and_its_ceiling(run_name):
    """bench/cpe_reach.py: a barely trained ResAG has not moved (reach about 1), above the ceiling; the ceiling falls
    as the rank grows and is a distance in [0, 1]."""
    import re
    from conftest import load_script
    done = call_script("train-scripts/train-cpe.py", "--prompt", "moon", *FAST, "--run_name", run_name)
    assert done.returncode == 0, done.stderr
    printed = call_script("bench/cpe_reach.py", run_name)
    assert printed.returncode == 0, printed.stderr
    reach, best = map(float, re.search(r"median ([\d.]+), .* ceiling \(median\) ([\d.]+);", printed.stdout).groups())
    assert reach > 0.95 and 0 < best < reach
    tool, model = load_script("bench/cpe_reach.py"), load_model("tiny-sd").model
    embeddings = tool.encode_pair(model, "moon", ["a {}", "a red {} in the style of Seurat", "{}"], "")
    by_rank = [max(tool.ceiling(model, *embeddings, rank).values()) for rank in (1, 4, 256)]
    assert 1 >= by_rank[0] >= by_rank[1] >= by_rank[2] >= 0
    assert "not a CPE run" in one_line_error(call_script("bench/cpe_reach.py", "tiny-sd"))
