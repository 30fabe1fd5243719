"""What every erasure trainer shares: the frozen teacher, a denoiser wrapper for sampling, the optimizer
step (mixed precision, non-finite losses refused) and resumable state.

A method subclasses ``ErasureTrainer`` and writes ``loss()`` (one iteration's loss, a scalar tensor) and
``edit_state()`` (what its run folder stores); ``step()``, ``state_dict()`` and ``load_state_dict()``
are shared, so every method resumes bit-identically after a kill.
"""
import contextlib
import copy

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ldm.runs import save_resume_state, save_trained_params
from ldm.util import UsageError


class NonFiniteLoss(UsageError):
    """The loss became NaN or infinite; the weights before that iteration are kept."""


class Teacher:
    """The frozen model: ``unet`` evaluated with the original values of its trained parameters.

    With ``device`` None, nothing but those values is copied. With a ``device`` (``--devices 0,1``;
    ``cpu,cpu`` too) the teacher is a frozen copy of the whole UNet there, as the original two-GPU setup.
    """

    def __init__(self, unet, trained_names, device=None):
        self.unet = unet
        params = dict(unet.named_parameters())
        self.device = torch.device(device) if device is not None else params[trained_names[0]].device
        if device is None:
            self.original = {n: params[n].detach().clone() for n in trained_names}
            self.copy = None
        else:
            self.copy = copy.deepcopy(unet).to(self.device).requires_grad_(False).eval()
            self.original = {}

    def original_values(self, names):
        """The frozen values of the parameters ``names``."""
        if self.copy is None:
            return {n: self.original[n] for n in names}
        params = dict(self.copy.named_parameters())
        return {n: params[n].detach() for n in names}

    @torch.no_grad()
    def __call__(self, x, t, context):
        home = x.device
        if self.copy is not None:
            return self.copy(x.to(self.device), t.to(self.device), context=context.to(self.device)).to(home)
        return functional_call(self.unet, self.original, (x, t), {"context": context}, strict=False)


class Denoiser:
    """What ``ddim_sample`` needs (``apply_model``, ``num_timesteps``, ``alphas_cumprod``) over a UNet call."""

    def __init__(self, model, unet_call):
        self.model, self.unet_call = model, unet_call
        self.num_timesteps, self.alphas_cumprod = model.num_timesteps, model.alphas_cumprod

    def apply_model(self, x, t, cond):
        return self.unet_call(x, t, cond)


def select_unet_parameters(unet, rule, what, hint):
    """Names (relative to the UNet) of the parameters for which ``rule(name)`` holds; none is an error."""
    names = [name for name, _ in unet.named_parameters() if rule(name)]
    if not names:
        raise UsageError(f"{what} selects no parameters of this UNet (its blocks are named differently); {hint}")
    return names


class ErasureTrainer:
    """The shared training loop state of an erasure method.

    ``params``: the tensors the optimizer trains (name -> tensor, requiring grad). Adam over them; with
    fp16 autocast on a GPU a gradient scaler; the weights and Adam's state stay fp32 either way.
    Subclasses set ``self.settings`` (a dataclass with ``check()`` and ``as_dict()``) before calling
    ``__init__`` of this class, implement ``loss()``, and may override ``stopped`` (a stop rule) and
    ``extra_state()``/``load_extra_state()``.
    """

    def __init__(self, params, lr, seed, device="cpu", autocast_dtype=None):
        self.params = params
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.optimizer = torch.optim.Adam(list(params.values()), lr=lr)
        use_scaler = autocast_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration, self.losses = 0, []
        self.gradient_sum = None  # accumulate_gradients(): the sum of every step's gradient so far

    def accumulate_gradients(self):
        """Step on the sum of every iteration's gradient so far, as CiE's public code does (it never zeroes
        them), instead of on each iteration's own. The sum is kept unscaled (fp16 loss scaling changes
        its scale between steps) and is part of the resumable state. Other methods never call this."""
        self.gradient_sum = {n: torch.zeros_like(p) for n, p in self.params.items()}

    def autocast(self):
        """Autocast to the trainer's dtype (disabled when none)."""
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def randint(self, high, low=0):
        """One integer in ``[low, high)`` from the trainer's own (resumable) generator."""
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def loss(self):
        """This iteration's loss (a scalar tensor with a graph to ``params``)."""
        raise NotImplementedError

    @property
    def stopped(self):
        """Whether a method's own stop rule has ended training (besides the iteration cap)."""
        return False

    def after_step(self, loss):
        """Hook after a successful step (a stop rule's statistics)."""

    def step(self):
        """One iteration; returns its loss. A non-finite loss raises before any weight changes."""
        self.optimizer.zero_grad(set_to_none=True)  # this iteration's own gradient (summed below if accumulating)
        loss = self.loss()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at iteration {self.iteration + 1}; the weights from before "
                                "it are kept; lower --lr or check the model's weights")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._add_to_gradient_sum()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._add_to_gradient_sum()
            self.optimizer.step()
        self.iteration += 1
        self.losses.append(loss.item())
        self.after_step(loss)
        return self.losses[-1]

    @torch.no_grad()
    def _add_to_gradient_sum(self):
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if self.gradient_sum is None or not all(torch.isfinite(g).all() for g in grads):
            return  # an overflowed fp16 step: the scaler skips it, and it is left out of the sum
        for name, param in self.params.items():
            if param.grad is not None:
                self.gradient_sum[name] += param.grad
            param.grad = self.gradient_sum[name].clone()

    def summary(self):
        """Figures a method reports about its run (recorded in ``training.json``)."""
        return {}

    def total_iterations(self):
        """The iteration cap of the run (a stop rule may end it earlier)."""
        return self.settings.iterations

    def describe(self):
        """Lines printed before training: what the method derived from its settings (none by default)."""
        return []

    def record(self):
        """Values derived from the settings that the run's config records beside them (none by default)."""
        return {}

    def save_edit(self, run_dir, metadata):
        """Write the run's edit into ``run_dir`` (what the method's registry entry applies back)."""
        raise NotImplementedError

    def edited_model(self):
        """The ``LatentDiffusion`` model with the edit applied, for samples and exports."""
        raise NotImplementedError

    def base_values(self):
        """The base values of the UNet parameters the edit changes (name -> tensor)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def without_edit(self):
        """Within this block ``edited_model()`` draws as the base model (the before/after grid): the
        edited parameters hold their base values, and their edited ones again afterwards."""
        params = dict(self.edited_model().model.diffusion_model.named_parameters())
        base = self.base_values()
        edited = {n: params[n].detach().clone() for n in base}
        with torch.no_grad():
            for name, value in base.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in edited.items():
                    params[name].copy_(value)

    def extra_state(self):
        """A method's own resumable state (tensors and plain values only)."""
        return {}

    def load_extra_state(self, state):
        """Restore what ``extra_state`` returned."""

    def state_dict(self):
        """Everything a resumed run needs; only tensors and plain Python values (loads with weights_only)."""
        return {"params": {n: p.detach().cpu().contiguous() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "iteration": self.iteration, "losses": list(self.losses),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "settings": self.settings.as_dict(), "extra": self.extra_state(),
                "gradient_sum": ({n: g.detach().cpu().clone() for n, g in self.gradient_sum.items()}
                                 if self.gradient_sum is not None else {})}

    def load_state_dict(self, state):
        """Continue from ``state`` (see :meth:`state_dict`); settings must match."""
        mine = self.settings.as_dict()
        if state["settings"] != mine:
            changed = sorted(k for k in set(state["settings"]) | set(mine) if state["settings"].get(k) != mine.get(k))
            raise UsageError(f"cannot resume: the checkpoint was made with other settings ({', '.join(changed)}); "
                             "rerun with the same arguments or start a new run")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.iteration, self.losses = int(state["iteration"]), list(state["losses"])
        if self.gradient_sum is not None:
            with torch.no_grad():
                for name, total in self.gradient_sum.items():
                    total.copy_(state["gradient_sum"][name])
        self.load_extra_state(state["extra"])


class OverlayTrainer(ErasureTrainer):
    """A trainer that fine-tunes some UNet parameters in place (ESD, CiE): the edit is those parameters
    (``trained-params.safetensors``, CompVis keys), the teacher the same UNet with their original values."""

    def __init__(self, model, trained_names, lr, seed, device="cpu", teacher_device=None, autocast_dtype=None):
        self.model = model
        self.unet = model.model.diffusion_model
        self.trained_names = trained_names
        self.unet.requires_grad_(False)
        params = dict(self.unet.named_parameters())
        super().__init__({n: params[n].requires_grad_(True) for n in trained_names}, lr, seed, device,
                         autocast_dtype)
        self.teacher = Teacher(self.unet, trained_names, device=teacher_device)

    def student(self, x, t, context):
        """The model being trained."""
        with self.autocast():
            return self.unet(x, t, context=context).float()

    def frozen(self, x, t, context):
        """The frozen base model (no gradient)."""
        with self.autocast():
            return self.teacher(x, t, context).float()

    def trained_state(self):
        """The trained parameters as a state dict with CompVis keys (``model.diffusion_model.*``)."""
        return {f"model.diffusion_model.{n}": p.detach().cpu().contiguous() for n, p in self.params.items()}

    def save_edit(self, run_dir, metadata):
        save_trained_params(run_dir, self.trained_state(), metadata)

    def edited_model(self):
        return self.model

    def base_values(self):
        return self.teacher.original_values(self.trained_names)


def run_training(trainer, iterations, run_dir, save_every=0, progress=True):
    """Step ``trainer`` up to ``iterations`` or until its stop rule ends it, writing the resumable state every
    ``save_every`` iterations and at the end. A failing step leaves the last good state on disk and re-raises."""
    with tqdm(total=iterations, initial=trainer.iteration, desc="erasing", disable=not progress) as bar:
        while trainer.iteration < iterations and not trainer.stopped:
            try:
                loss = trainer.step()
            except Exception:
                save_resume_state(run_dir, trainer.state_dict())
                raise
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)  # drawn at the bar's own interval, not every step
            if save_every and trainer.iteration % save_every == 0:
                save_resume_state(run_dir, trainer.state_dict())
    save_resume_state(run_dir, trainer.state_dict())
    return trainer
