"""Attacks on concept erasure (docs/attacks.md): UnlearnDiffAtk
(``unlearndiffatk``), Ring-A-Bell (``ringabell``) and the harness that runs them and judges the images
(``harness``, behind ``eval-scripts/attack.py``)."""
