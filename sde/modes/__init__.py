"""The modes of ``main.py``, one module each: ``check(config)`` (its own keys, then the shared
checks of ``sde.configuration``) and ``run(config, workdir)`` (check, then work).

The table of modes is ``main.MODES``; the work the modes share lives below them, in
``sde.generation`` (batches of samples with per-sample seeds) and ``sde.quality`` (FID, KID,
classifier metrics, reference statistics).
"""
