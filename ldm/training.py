"""Training with the Lightning Trainer: resumable runs and the export of a CompVis checkpoint."""
import json
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from ldm.plots import save_loss_plot
from ldm.util import UsageError, atomic_to_csv, atomic_write_text, dict_differences


def fit(model, dataset, work_dir, max_steps, batch_size, learning_rate, seed=0, save_every=500,
        loss_key="train/loss", fingerprint=None):
    """Train ``model`` for ``max_steps`` with Lightning; resumes from ``work_dir/last.ckpt`` when present.

    ``fingerprint`` (a JSON-able dict: config, data, base weights) is stored in ``work_dir/run.json``;
    resuming a run whose fingerprint, seed, batch size or learning rate differ is refused, so a work
    folder never continues someone else's training. Leaves ``work_dir/metrics.csv`` and ``loss.png``.
    """
    work_dir = Path(work_dir)
    check_resume(work_dir, {"fingerprint": fingerprint, "seed": seed, "batch_size": batch_size,
                            "learning_rate": learning_rate})
    pl.seed_everything(seed, workers=True, verbose=False)
    model.learning_rate = learning_rate
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    checkpoints = ModelCheckpoint(dirpath=work_dir, filename="step-{step}", save_last=True,
                                  every_n_train_steps=save_every, save_top_k=1)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="auto", devices=1, default_root_dir=work_dir,
                         logger=CSVLogger(work_dir, name="", version=""), callbacks=[checkpoints],
                         log_every_n_steps=min(25, max_steps), enable_model_summary=False, num_sanity_val_steps=0)
    last = work_dir / "last.ckpt"
    history = _keep_metrics_history(work_dir) if last.exists() else None
    trainer.fit(model, loader, ckpt_path=str(last) if last.exists() else None)
    if (work_dir / "metrics.csv").exists():
        metrics = pd.read_csv(work_dir / "metrics.csv")
        if history is not None and len(metrics):  # Lightning's CSVLogger restarts the file on resume
            metrics = pd.concat([history[history["step"] < metrics["step"].min()], metrics], ignore_index=True)
            atomic_to_csv(metrics, work_dir / "metrics.csv")
        column = f"{loss_key}_step" if f"{loss_key}_step" in metrics else loss_key
        if column in metrics:
            metrics = metrics.dropna(subset=[column])
            save_loss_plot(metrics["step"], metrics[column], work_dir / "loss.png",
                           title=f"{type(model).__name__} {column}")
    return model


def check_resume(work_dir, settings):
    """Record ``settings`` in ``work_dir/run.json``, or, when the folder already holds a run, refuse to go
    on unless they are the same (one line naming what differs)."""
    record = work_dir / "run.json"
    settings = json.loads(json.dumps(settings, default=str))
    if (work_dir / "last.ckpt").exists():
        if not record.exists():
            raise UsageError(f"'{work_dir}' holds a checkpoint with no run.json, so it cannot be checked before "
                             "resuming; delete the folder or pass another work folder")
        old = json.loads(record.read_text())
        differ = sorted(dict_differences(old, settings))
        if differ:
            raise UsageError(f"'{work_dir}' holds a run with other settings ({', '.join(differ[:4])}); resume "
                             "with the same ones, or pass another work folder (or delete this one) to start anew")
        return
    atomic_write_text(record, json.dumps(settings, indent=1, sort_keys=True))


def _keep_metrics_history(work_dir):
    """Before a resumed fit: fold ``metrics.csv`` into ``metrics-history.csv`` (kept if the run is killed
    again) and return the history so far."""
    parts = [pd.read_csv(work_dir / name) for name in ("metrics-history.csv", "metrics.csv")
             if (work_dir / name).exists()]
    if not parts:
        return None
    history = pd.concat(parts, ignore_index=True).drop_duplicates().sort_values("step", kind="stable")
    atomic_to_csv(history, work_dir / "metrics-history.csv")
    return history
