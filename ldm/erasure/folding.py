"""Edits that fold into static weights (ESD, CiE, SepCE), applied to a diffusers pipeline: the run's base
CompVis checkpoint (checked by SHA-256) with the edit applied, converted by diffusers' own converter."""
from pathlib import Path

from ldm.convert import convert_unet
from ldm.runs import check_base
from ldm.util import UsageError, load_config, load_model_from_config


def fold_into_diffusers(pipeline, run_dir, apply):
    """Load run ``run_dir``'s edited UNet (its base with ``apply(model, run_dir)``) into ``pipeline.unet`` (or a
    bare ``UNet2DConditionModel``); a UNet of another shape is one line. Returns ``pipeline``."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    model = load_model_from_config(config, check_base(run_dir, config.base_model))
    apply(model, run_dir)
    unet = getattr(pipeline, "unet", pipeline)
    weights = convert_unet(model.state_dict(), config).state_dict()
    ours = unet.state_dict()
    if set(weights) != set(ours) or any(ours[k].shape != v.shape for k, v in weights.items()):
        raise UsageError(f"this diffusers UNet is not shaped as run '{run_dir.name}''s base model; "
                         "load the run's own base pipeline (convertModels.py writes one)")
    unet.load_state_dict({k: v.to(ours[k].dtype) for k, v in weights.items()})
    return pipeline
