"""The KL-regularised autoencoder (SD v1's first stage), with CompVis names."""
import pytorch_lightning as pl
import torch

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config, load_checkpoint_file, load_state_dict_strict, state_dict_from_checkpoint


class AutoencoderKL(pl.LightningModule):
    """Encoder to a diagonal Gaussian over latents, decoder back to images in [-1, 1].

    ``lossconfig`` builds the training loss (``torch.nn.Identity`` in inference configs); training
    uses it as ``loss(inputs, reconstructions, posterior)`` returning a scalar.
    """

    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, learning_rate=4.5e-6):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self.monitor = monitor
        self.learning_rate = learning_rate
        if ckpt_path is not None:
            state_dict = state_dict_from_checkpoint(load_checkpoint_file(ckpt_path))
            load_state_dict_strict(self, state_dict, ignored=("loss.*", *(f"{k}*" for k in ignore_keys)),
                                   source=f"checkpoint '{ckpt_path}'")

    def encode(self, x):
        """Image (B, 3, H, W) in [-1, 1] to the latent posterior."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Latent (B, embed_dim, h, w) to image."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch, key):
        """Images from a batch, channels-last (B, H, W, C) as CompVis datasets give them, to (B, C, H, W)."""
        x = batch[key]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format).float()

    def training_step(self, batch, batch_idx):
        x = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(x)
        loss = self.loss(x, reconstructions, posterior)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(x, sample_posterior=False)
        loss = self.loss(x, reconstructions, posterior)
        self.log("val/rec_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if not n.startswith("loss.")]
        return torch.optim.Adam(params, lr=self.learning_rate, betas=(0.5, 0.9))
