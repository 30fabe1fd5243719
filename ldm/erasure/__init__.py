"""Concept erasure methods and their run folders.

    trainer.py  what every method's trainer shares (teacher, optimizer step, resumable state)
    runs.py     run folders: writing, loading (each method's edit by the method recorded), restoring
    esd.py      ESD (Gandikota et al. 2023)
    cie.py      CiE (Zhao et al. 2024): concept-irrelevant loss, momentum stop rule, training images
    sepce.py    SepCE (Zhao et al. 2024): separable null-space terms on to_k/to_v
    report.py   erasure and preservation tables
"""
