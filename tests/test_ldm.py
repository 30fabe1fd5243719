"""Behaviour of the ldm pieces the erasure methods build on: sampling, checkpointing, training."""
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.lr_scheduler import LambdaLinearScheduler
from ldm.models.diffusion.ddim import DDIMSampler, cfg_denoise, ddim_sample, make_ddim_timesteps
from ldm.util import instantiate_from_config

from conftest import randomize_


def test_ddim_timesteps_match_compvis_and_diffusers():
    assert make_ddim_timesteps(50).tolist() == list(range(1, 1000, 20))
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(steps_offset=1)
    for steps in (20, 3, 7, 999):  # also step counts that do not divide 1000
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.flip(0).tolist() == make_ddim_timesteps(steps).tolist()


def test_partial_sampling_returns_the_trajectory_state(small_model):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = small_model.get_learned_conditioning(["a yellow heart"])
    uncond = small_model.get_learned_conditioning([""])
    with torch.no_grad():
        _, full = ddim_sample(small_model, x_T, cond, uncond, 3.0, num_steps=10, log_every_t=1)
        for k in (0, 1, 4, 10):
            x_k, _ = ddim_sample(small_model, x_T, cond, uncond, 3.0, num_steps=10, till_T=k)
            assert torch.allclose(x_k, full["x_inter"][k], atol=1e-6)
    with pytest.raises(ValueError, match="till_T must be in 0..10"):
        ddim_sample(small_model, x_T, cond, num_steps=10, till_T=11)


def test_batched_guidance_equals_two_forwards(small_model):
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 700])
    cond = small_model.get_learned_conditioning(["a star", "a cross"])
    uncond = small_model.get_learned_conditioning(["", ""])
    with torch.no_grad():
        batched = cfg_denoise(small_model, x, t, cond, uncond, 7.5)
        e_c, e_u = small_model.apply_model(x, t, cond), small_model.apply_model(x, t, uncond)
    assert torch.allclose(batched, e_u + 7.5 * (e_c - e_u), atol=1e-5)


def test_sampler_rejects_options_it_does_not_implement(small_model):
    with pytest.raises(ValueError, match="not supported: mask"):
        DDIMSampler(small_model).sample(S=2, batch_size=1, shape=(4, 8, 8), mask=torch.ones(1))


def _saved_bytes(unet, x, t, context):
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = unet(x, t, context=context)
    return total, out


def test_gradient_checkpointing_saves_activation_memory(small_config):
    params = OmegaConf.to_container(small_config.model.params.unet_config.params)
    unets = {}
    for flag in (False, True):
        params["use_checkpoint"] = flag
        unets[flag] = randomize_(instantiate_from_config({"target": small_config.model.params.unet_config.target,
                                                          "params": params}), seed=0).train()
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 64)
    plain_bytes, plain_out = _saved_bytes(unets[False], x, t, context)
    ckpt_bytes, ckpt_out = _saved_bytes(unets[True], x, t, context)
    assert ckpt_bytes < 0.5 * plain_bytes
    plain_out.square().mean().backward()
    ckpt_out.square().mean().backward()
    for (name, p), q in zip(unets[False].named_parameters(), unets[True].parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


class _Captions(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        return {"jpg": torch.rand(64, 64, 3, generator=generator) * 2 - 1, "txt": ["a red star", ""][i % 2]}


def test_lightning_trains_only_the_unet(small_config, tmp_path):
    config = OmegaConf.merge(small_config, {"model": {"params": {"scale_by_std": True, "use_ema": True}}})
    model = randomize_(instantiate_from_config(config.model), seed=2)
    model.learning_rate = 1e-3
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.")}
    unet_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(_Captions(), batch_size=2))
    state = model.state_dict()
    assert float(state["scale_factor"]) != 1.0  # computed from the first batch, stored as a buffer
    assert any(not torch.equal(unet_before[k], v) for k, v in model.model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if not k.startswith(("model_ema.", "scale_factor")))
    assert int(state["model_ema.num_updates"]) == 2


def test_lambda_linear_scheduler_warms_up():
    schedule = LambdaLinearScheduler(warm_up_steps=[10], f_min=[1.0], f_max=[1.0], f_start=[1e-6],
                                     cycle_lengths=[10**13])
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(5) == pytest.approx(0.5, rel=1e-3)
    assert schedule(100) == pytest.approx(1.0)


def test_benchmark_helpers_measure_real_allocations():
    from ldm.benchmark import peak_memory, time_interleaved
    cpu = torch.device("cpu")
    small = peak_memory(lambda: torch.ones(1024, 1024).sum(), cpu)  # 4 MiB
    large = peak_memory(lambda: torch.ones(64, 1024, 1024).sum(), cpu)  # 256 MiB
    assert 200 * 2**20 < large < 400 * 2**20 and small < 64 * 2**20
    times = time_interleaved({"a": lambda: torch.ones(10).sum()}, cpu, iters=3, warmup=1)
    assert 0 < times["a"] < 1


def test_snr_loss_weights(small_config):
    model = instantiate_from_config(small_config.model)
    t = torch.arange(0, 1000, 50)
    snr = model.alphas_cumprod[t] / (1 - model.alphas_cumprod[t])
    assert torch.all(model.snr_loss_weight(t) == 1)  # CompVis' plain eps-loss by default
    model.min_snr_gamma = 5.0
    weight = model.snr_loss_weight(t)
    assert torch.allclose(weight[snr > 5], 5 / snr[snr > 5]) and torch.all(weight[snr <= 5] == 1)
    model.truncated_snr = True  # x0-loss times SNR clamped to [1, 5]: high-noise steps weigh 1 / SNR
    weight = model.snr_loss_weight(t)
    assert torch.allclose(weight[snr < 1], 1 / snr[snr < 1]) and torch.allclose(weight[snr > 5], 5 / snr[snr > 5])
    assert weight[-1] > 100 and torch.all(weight[(snr >= 1) & (snr <= 5)] == 1)


def test_min_snr_loss_counts_easy_timesteps_less(small_config):
    config = OmegaConf.merge(small_config, {"model": {"params": {"min_snr_gamma": 5.0}}})
    model = instantiate_from_config(config.model)
    x, cond = torch.randn(2, 4, 8, 8), model.get_learned_conditioning(["a", "b"])
    torch.manual_seed(0)
    weighted, logs = model.p_losses(x, cond, torch.tensor([1, 900]))
    assert weighted < logs["train/loss_simple"]  # the low-noise sample counts less


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_fit_resumes_and_keeps_the_loss_history(small_config, tmp_path):
    from ldm.training import fit
    import pandas as pd

    def model():
        torch.manual_seed(0)
        return randomize_(instantiate_from_config(small_config.model), seed=2)

    fit(model(), _Captions(), tmp_path, max_steps=2, batch_size=2, learning_rate=1e-4, save_every=2)
    first = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["train/loss_step"])
    resumed = model()
    fit(resumed, _Captions(), tmp_path, max_steps=4, batch_size=2, learning_rate=1e-4, save_every=2)
    metrics = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["train/loss_step"])
    assert resumed.global_step == 4
    assert set(first["step"]) < set(metrics["step"]) and metrics["step"].is_monotonic_increasing
    assert (tmp_path / "loss.png").is_file()


def test_text_supervision_reads_what_captions_name_and_is_dropped_at_export(small_config, tmp_path):
    from ldm.data.tiny_sd import IGNORE
    from ldm.models.diffusion.text_supervised import training_config
    from ldm.convert import export_checkpoint
    from ldm.util import load_model_from_config
    model = instantiate_from_config(training_config(small_config).model)
    embedder = model.cond_stage_model
    assert not embedder.transformer.get_input_embeddings().weight.requires_grad  # token table fixed
    trained = {id(p) for p in model.trainable_parameters()}
    assert any(id(p) in trained for p in embedder.parameters()) and all(id(p) in trained for p in model.text_heads.parameters())
    assert id(embedder.transformer.get_input_embeddings().weight) not in trained
    width = embedder.transformer.config.hidden_size
    context = torch.randn(2, 5, width)
    batch = {"caption_object": torch.tensor([3, IGNORE]), "caption_color": torch.tensor([IGNORE, IGNORE]),
             "caption_style": torch.tensor([2, 6])}
    pooled = context.mean(1)
    expected = (torch.nn.functional.cross_entropy(model.text_heads["object"](pooled[:1]), torch.tensor([3]))
                + torch.nn.functional.cross_entropy(model.text_heads["style"](pooled), torch.tensor([2, 6]))) / 2
    assert torch.allclose(model.text_loss(context, batch), expected)
    path = export_checkpoint(model, tmp_path / "model.ckpt")
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith(("text_heads.", "model_ema.", "cond_stage_model_ema.")) for k in state)
    load_model_from_config(small_config, path)  # a plain LatentDiffusion, strictly


def test_concept_world_labels_what_each_caption_names():
    from ldm.data.concepts import ATTRIBUTES
    from ldm.data.tiny_sd import IGNORE, ConceptWorld
    world = ConceptWorld(size=40, seed=3)
    for i in range(40):
        item = world[i]
        for name, values in ATTRIBUTES.items():
            label = item[f"caption_{name}"]
            if label == IGNORE:
                continue
            assert label == item[name]  # a caption only names the image's own values
            word = values[label] if values[label] != "none" else "flat colors"
            assert word.lower() in item["caption"].lower()
        if item["caption"] == "":
            assert all(item[f"caption_{n}"] == IGNORE for n in ATTRIBUTES)
