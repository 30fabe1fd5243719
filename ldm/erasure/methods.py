"""The method registry: the one place a method is listed. Each entry names the method's settings (their
flags, defaults and model-config blocks come from the settings dataclass), how its trainer is built, how
its edit is applied to our ``ldm`` model and to a diffusers pipeline, whether a concept can be restored,
what the erasure report and the benchmark judge it against, and its line in the demo. Scripts, loading,
the report, the benchmark, the demo and the exports all ask this module; adding a method is its module,
its entry below, and its tests.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from ldm.erasure.cie import CiESettings, CiETrainer
from ldm.erasure.cpe import CPESettings, CPETrainer
from ldm.erasure.cpe_prompts import anchors_for
from ldm.erasure.cpe_gates import apply_resags_of, apply_to_diffusers as apply_resags_to_diffusers
from ldm.erasure.esd import ESDSettings, ESDTrainer, run_name as esd_run_name
from ldm.erasure.folding import fold_into_diffusers
from ldm.erasure.sepce import SepCESettings, SepCETrainer, apply_terms_of, protected_set, read_terms, term_basis
from ldm.erasure.settings import setting_fields
from ldm.erasure.uce import UCEEditor, UCESettings, apply_uce_of
from ldm.runs import apply_trained_params, find_run
from ldm.util import UsageError, load_config

# The erasure report's bars: the erased concept found in at most 10% of images; drops in points for the other
# values of its attribute ("same attribute"), the attribute's values kept elsewhere and the other attributes.
ESD_BARS = {"efficacy": 0.10, "same attribute": 5.0, "kept elsewhere": 5.0, "other attributes": 3.0}


@dataclass(frozen=True)
class Method:
    """One erasure method (or one variant of a method, as ESD's train methods)."""
    name: str
    family: str  # the module family: its model-config block is ``<family>_defaults``
    description: str  # one line, for --help and the demo
    settings: type  # a ``MethodSettings`` dataclass
    build: Callable  # (settings, model, devices, autocast_dtype, latents) -> an ErasureTrainer; latents() draws
    # the concept's training images (CiE, SepCE), called once the method has refused what it can refuse cheaply
    apply: Callable  # (model, run_dir) -> model: the run's edit over its base
    apply_to_diffusers: Callable  # (pipeline, run_dir) -> the pipeline (or hooks, for gates) with the edit
    restorable: bool  # a concept can be dropped from a run (restore-concept.py)
    foldable: bool  # the edit folds into static weights (single-file and diffusers exports)
    bars: dict = field(default_factory=lambda: dict(ESD_BARS))
    run_name: Callable = None  # settings -> the default run name
    fixed: dict = field(default_factory=dict)  # settings a variant fixes (ESD's train method)
    concept_images: bool = False  # trains on the base model's images of the concept (CiE, SepCE)
    max_devices: int = 2  # 2: a frozen teacher on a second device
    mixed_precision: bool = True  # runs the UNet, so --mixed_precision and --gradient_checkpointing apply
    benchmarked: bool = False  # in the benchmark's default set
    base_of: Callable = None  # flags -> (config_path, ckpt_path) of a run it builds on, or None
    records: tuple = ()  # (method, train_method) as older versions recorded runs of this method

    @property
    def config_blocks(self):
        """The model config's blocks this method reads, general first: ``<family>_defaults``, ``<name>_defaults``."""
        return tuple(dict.fromkeys([f"{self.family}_defaults", f"{self.name}_defaults"]))

    def flag_names(self):
        """The setting flags this method takes, and the precision flags where it runs the UNet."""
        names = {f.name for f in setting_fields(self.settings) if f.metadata["flag"] and f.name not in self.fixed}
        return names | ({"mixed_precision", "gradient_checkpointing"} if self.mixed_precision else set())


def _esd_build(settings, model, devices, autocast_dtype, latents):
    return ESDTrainer(model, settings, devices[0], devices[1] if len(devices) == 2 else None, autocast_dtype)


def _cie_build(settings, model, devices, autocast_dtype, latents):
    return CiETrainer(model, settings, latents(), devices[0], devices[1] if len(devices) == 2 else None, autocast_dtype)


def _is_sepce_run(config):
    return method_of_run(config).name == "sepce"


def _sepce_base(flags):
    """SepCE ``--on RUN``: the new term is built on the earlier run's base model."""
    if not flags.get("on"):
        return None
    base = load_config(find_run(flags["on"], "--on", _is_sepce_run, "a sepce run") / "config.yaml").base_model
    return base.config_path, base.ckpt_path


def _sepce_build(settings, model, devices, autocast_dtype, latents):
    earlier = read_terms(find_run(settings.on, "--on", _is_sepce_run, "a sepce run")) if settings.on else []
    if settings.prompt.strip() in [t["concept"] for t in earlier]:  # refused before any image is drawn
        raise UsageError(f"'{settings.prompt}' is already erased by the run given to --on; restore it first "
                         "(restore-concept.py) or erase another concept")
    protected = protected_set(settings.keep_set(), earlier, settings.prompt)
    basis = term_basis(model, protected, settings.rtol, settings.prompt)  # may refuse the set: before any image
    return SepCETrainer(model, settings, latents(), protected, basis, earlier, devices[0], autocast_dtype)


def _cpe_build(settings, model, devices, autocast_dtype, latents):
    return CPETrainer(model, settings, anchors_for(model, settings), devices[0])


def _uce_build(settings, model, devices, autocast_dtype, latents):
    return UCEEditor(model, settings)


def _cie_run_name(settings):
    s = settings
    return f"cie-word_{s.prompt.replace(' ', '')}-lr_{s.lr}-tau_{s.tau}-iter_{s.iterations}"


def _sepce_run_name(settings):
    return f"sepce-word_{settings.prompt.replace(' ', '')}" + (f"-on_{settings.on}" if settings.on else "")


def _cpe_run_name(settings):
    return "cpe-word_" + "_".join(w.replace(" ", "") for w in settings.concepts())


def _uce_run_name(settings):
    return "uce-word_" + "_".join(w.replace(" ", "") for w in settings.concepts())


FOLD_OVERLAY = partial(fold_into_diffusers, apply=apply_trained_params)


def _esd(name, train_method, description, benchmarked=False):
    return Method(name=name, family="esd", description=description, settings=ESDSettings, build=_esd_build,
                  apply=apply_trained_params, apply_to_diffusers=FOLD_OVERLAY, restorable=False, foldable=True,
                  run_name=esd_run_name, fixed={"train_method": train_method}, benchmarked=benchmarked,
                  records=(("esd", train_method), ("esd", name)))


REGISTRY = [
    _esd("esd-x", "xattn", "ESD-x: fine-tunes cross-attention to the negatively guided target (styles, names)",
         benchmarked=True),
    _esd("esd-u", "noxattn", "ESD-u: fine-tunes all but cross-attention (global concepts such as nudity)",
         benchmarked=True),
    _esd("esd-all", "full", "ESD on every UNet parameter"),
    _esd("esd-self", "selfattn", "ESD on self-attention only"),
    _esd("esd-notime", "notime", "ESD on all but the time embedding and output layers"),
    _esd("esd-xlayer", "xlayer", "ESD on two decoder cross-attention layers"),
    _esd("esd-selflayer", "selflayer", "ESD on two encoder self-attention layers"),
    _esd("esd-x-strict", "xattn-strict", "ESD on cross-attention keys and values only"),
    Method(name="cie", family="cie", description="CiE: turns the concept's noise direction away on the model's own "
           "images (cross-attention)", settings=CiESettings, build=_cie_build, apply=apply_trained_params,
           apply_to_diffusers=FOLD_OVERLAY, restorable=False, foldable=True,
           bars={**ESD_BARS, "same attribute": 2.0}, run_name=_cie_run_name,
           concept_images=True, benchmarked=True, records=(("cie", None),)),
    Method(name="sepce", family="sepce", description="SepCE: one separable, restorable term per concept, exact on "
           "the protected prompts", settings=SepCESettings, build=_sepce_build, apply=apply_terms_of,
           apply_to_diffusers=partial(fold_into_diffusers, apply=apply_terms_of), restorable=True, foldable=True,
           bars={**ESD_BARS, "same attribute": 3.0, "other attributes": 2.0}, run_name=_sepce_run_name,
           concept_images=True, max_devices=1,
           benchmarked=True, base_of=_sepce_base, records=(("sepce", None),)),
    Method(name="cpe", family="cpe", description="CPE: a residual attention gate per concept on cross-attention "
           "keys and values, trained on text alone (restorable)", settings=CPESettings, build=_cpe_build,
           apply=apply_resags_of, apply_to_diffusers=apply_resags_to_diffusers, restorable=True, foldable=False,
           bars={**ESD_BARS, "same attribute": 3.0, "other attributes": 2.0}, run_name=_cpe_run_name, max_devices=1,
           mixed_precision=False, benchmarked=True, records=(("cpe", None),)),
    Method(name="uce", family="uce", description="UCE: a closed-form edit of cross-attention keys and values that "
           "maps the concept to a guide and holds preserved concepts (restorable)", settings=UCESettings,
           build=_uce_build, apply=apply_uce_of, apply_to_diffusers=partial(fold_into_diffusers, apply=apply_uce_of),
           restorable=True, foldable=True, bars={**ESD_BARS, "same attribute": 3.0, "other attributes": 2.0},
           run_name=_uce_run_name, max_devices=1, mixed_precision=False, benchmarked=True, records=(("uce", None),)),
]
METHODS = {method.name: method for method in REGISTRY}


def get(name):
    """The registered method ``name``; an unknown name is one line listing them."""
    if name not in METHODS:
        raise UsageError(f"method '{name}' unknown; use one of: {', '.join(METHODS)}")
    return METHODS[name]


def benchmarked():
    """The names of the methods the benchmark compares by default."""
    return [m.name for m in REGISTRY if m.benchmarked]


def esd_variant(train_method):
    """The ESD variant ``--train_method`` names: a train method (``xattn``) or a variant's name (``esd-x``)."""
    for method in REGISTRY:
        if method.family == "esd" and train_method in (method.name, method.fixed["train_method"]):
            return method
    known = [m.fixed["train_method"] for m in REGISTRY if m.family == "esd"]
    names = [m.name for m in REGISTRY if m.family == "esd"]
    raise UsageError(f"train method '{train_method}' unknown; use one of: {', '.join(known + names)}")


def method_of_run(config):
    """The method that made a run (its config): ``run.method``, or an older version's record of it."""
    run = config.run
    recorded = run.get("method")
    if recorded in METHODS:
        return METHODS[recorded]
    for method in REGISTRY:
        for name, train_method in method.records:
            if recorded == name and train_method in (None, run.get("train_method")):
                return method
    raise UsageError(f"run records method '{recorded}', which this version cannot load (known: {', '.join(METHODS)})")
