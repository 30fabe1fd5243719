"""CiE's and SepCE's loop as the authors' code runs it, and its flags: accumulated gradients (resumable), the
stop statistic started at the first measured value, the direction loss over agreeing elements, the L1
weight relative to the direction loss's first pull (one per concept), and one-line bad input."""
import copy
import json

import pytest
import torch

from ldm.erasure.cie import CiESettings, CiETrainer, MomentumStop, concept_irrelevance, relative_l1_lambda
from ldm.erasure.sepce import SepCESettings, SepCETrainer, default_keep, protected_set, read_terms, term_basis
from ldm.paths import models_dir

from conftest import call_script, one_line_error


def latents_of(model, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, 4, model.image_size, model.image_size), generator=generator)


def cie(**changes):
    return CiESettings(**{"prompt": "Van Gogh", "iterations": 5, "lr": 1e-3, "tau": 0.0, "warmup": 2,
                          "batch_size": 2, **changes})


def test_the_authors_choices_are_the_paper_defaults():
    s = CiESettings(prompt="moon")
    assert (s.gradients, s.momentum_start, s.direction_loss, s.l1_scale, s.tau, s.l1_weight) == \
        ("accumulate", "first", "all", "absolute", 5e-5, 1e-5)


def test_accumulated_gradients_are_the_running_sum_and_resume_exactly(tiny, new_tiny):
    """accumulate: the second step's gradient is the first's plus its own (the zeroing trainer, from the same
    seed and weights, sees that own gradient); a resumed run continues bit-identically."""
    summing, zeroing = CiETrainer(tiny, cie(), latents_of(tiny)), CiETrainer(new_tiny(), cie(gradients="zero"),
                                                                            latents_of(tiny))
    assert zeroing.gradient_sum is None and summing.gradient_sum is not None
    for trainer in (summing, zeroing):
        trainer.step()
    first = {n: p.grad.clone() for n, p in zeroing.params.items()}
    assert all(torch.equal(p.grad, first[n]) for n, p in summing.params.items())
    summing.step(), zeroing.step()
    for name, param in summing.params.items():
        assert torch.allclose(param.grad, first[name] + zeroing.params[name].grad, atol=1e-12, rtol=1e-5)
    state = copy.deepcopy(summing.state_dict())
    summing.step()
    resumed = CiETrainer(new_tiny(), cie(), latents_of(tiny))
    resumed.load_state_dict(state)
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(summing.params.values(), resumed.params.values()))
    assert all(torch.equal(summing.gradient_sum[n], resumed.gradient_sum[n]) for n in summing.params)


def test_momentum_statistic_starts_at_the_first_value_or_at_zero():
    first, zero = MomentumStop(tau=0.5, warmup=0), MomentumStop(tau=0.5, warmup=0, start="zero")
    first.update(2.0), zero.update(2.0)
    assert first.m == pytest.approx(2.0) and zero.m == pytest.approx(0.2) and zero.stopped and not first.stopped
    first.update(0.0)
    assert first.m == pytest.approx(1.8)


def test_agreeing_direction_loss_counts_only_agreeing_elements_and_is_bounded_by_zero():
    r, r_star = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([1.0, 2.0, 1.0, -1.0])
    assert concept_irrelevance(r, r_star) == pytest.approx((1 - 4 + 3 - 0.5) / 4)
    assert concept_irrelevance(r, r_star, agreeing=True) == pytest.approx((1 + 3) / 4)
    assert concept_irrelevance(-r_star, r_star, agreeing=True) == 0


def test_relative_l1_lambda_is_rho_times_tensors_times_rms():
    gradients = [torch.full((2, 2), 3.0), torch.full((4,), -3.0)]
    assert relative_l1_lambda(gradients, 0.5) == pytest.approx(0.5 * 2 * 3.0)
    # the L1 term's pull per element (lambda / tensors) is rho times the RMS, whatever the count of elements
    big = [torch.full((64, 64), 3.0)] * 2
    assert relative_l1_lambda(big, 0.5) / 2 == pytest.approx(relative_l1_lambda(gradients, 0.5) / 2)


def test_relative_l1_weight_is_calibrated_on_the_first_step_per_concept(tiny, new_tiny):
    """CiE: lambda from dL_dir/dW of the first step; SepCE: one lambda per concept, from d L_dir / d W of
    its own term (not of the alphas), kept through a resume."""
    trainer = CiETrainer(tiny, cie(l1_scale="relative", l1_weight=0.1, gradients="zero"), latents_of(tiny))
    assert trainer.l1_lambda is None
    trainer.step()
    expected = relative_l1_lambda([p.grad for p in trainer.params.values()], 0.1)  # the first step: L1 pulls 0
    assert trainer.l1_lambda == pytest.approx(expected, rel=1e-5) and trainer.summary()["l1_lambda"] > 0
    lambdas = {}
    for concept in ("moon", "heart"):
        keep = default_keep(concept)
        model = new_tiny()
        settings = SepCESettings(prompt=concept, keep=",".join(keep), iterations=2, lr=1e-2, batch_size=2,
                                 l1_scale="relative", l1_weight=0.1)
        protected = protected_set(keep, concept=concept)
        sepce = SepCETrainer(model, settings, latents_of(model), protected, term_basis(model, protected))
        sepce.step()
        lambdas[concept] = sepce.l1_lambda
        state = copy.deepcopy(sepce.state_dict())
        again = SepCETrainer(new_tiny(), settings, latents_of(model), protected, term_basis(model, protected))
        again.load_state_dict(state)
        assert again.l1_lambda == sepce.l1_lambda
    assert all(v > 0 for v in lambdas.values()) and lambdas["moon"] != lambdas["heart"]


FAST = ["--iterations", 2, "--num_images", 2, "--batch_size", 1, "--devices", "cpu", "--no_diffusers", "--no_samples"]


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_scripts_record_each_terms_own_l1_weight(run_name):
    """train-sepce.py twice (--on) with --l1_scale relative: each term records its own lambda."""
    first, second = f"{run_name}-a", f"{run_name}-b"
    relative = ["--l1_scale", "relative", "--l1_weight", 0.05]
    done = call_script("train-scripts/train-sepce.py", "--prompt", "moon", *FAST, *relative, "--run_name", first)
    assert done.returncode == 0, done.stderr
    recorded = json.loads((models_dir() / first / "training.json").read_text())["l1_lambda"]
    done = call_script("train-scripts/train-sepce.py", "--prompt", "heart", *FAST, *relative, "--on", first,
                       "--run_name", second)
    assert done.returncode == 0, done.stderr
    terms = {t["concept"]: float(t["metadata"]["l1_lambda"]) for t in read_terms(models_dir() / second)}
    assert terms["moon"] == pytest.approx(recorded) and terms["heart"] > 0 and terms["heart"] != terms["moon"]


@pytest.mark.parametrize("flags,message", [
    (["--direction_loss", "agreeing", "--tau=-1e-3"], "can never stop"),
    (["--gradients", "sum"], "invalid choice"),
    (["--l1_scale", "per-element"], "invalid choice"),
    (["--momentum_start", "last"], "invalid choice"),
])
def test_bad_loop_flags_are_one_line(flags, message, run_name):
    for script in ("train-cie.py", "train-sepce.py"):
        line = one_line_error(call_script(f"train-scripts/{script}", "--prompt", "heart", *flags, "--run_name",
                                          run_name, "--num_images", 2, "--devices", "cpu"))
        assert message in line, line
        assert not (models_dir() / run_name).exists()
