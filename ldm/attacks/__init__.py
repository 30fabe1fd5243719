"""Attacks on concept erasure (METHODS.md, "Attacks the field uses"): UnlearnDiffAtk
(``unlearndiffatk``), Ring-A-Bell (``ringabell``) and the harness that runs them and judges the images
(``harness``, behind ``eval-scripts/attack.py``)."""
