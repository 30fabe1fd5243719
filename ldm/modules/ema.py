"""Exponential moving average of a model's parameters, stored as CompVis' ``model_ema.*`` buffers."""
import torch
from torch import nn


class LitEma(nn.Module):
    """EMA copy of ``model``'s trainable parameters; buffer names are the parameter names without dots."""

    def __init__(self, model, decay=0.9999, use_num_upates=True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("EMA decay must be between 0 and 1")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params = []

    @torch.no_grad()
    def forward(self, model):
        """Move the EMA one step towards ``model``'s current parameters."""
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_((1.0 - decay) * (s - param.to(s.dtype)))

    def copy_to(self, model):
        """Write the EMA weights into ``model``."""
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data.copy_(shadow[self.m_name2s_name[name]].data)

    def store(self, parameters):
        """Keep a copy of ``parameters`` to restore after evaluating with EMA weights."""
        self.collected_params = [param.clone() for param in parameters]

    def restore(self, parameters):
        """Put back the parameters saved by ``store``."""
        for saved, param in zip(self.collected_params, parameters):
            param.data.copy_(saved.data)
