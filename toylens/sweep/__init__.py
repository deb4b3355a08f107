"""Sweeps: many runs from one ``toylens-train -m`` command, on any Hydra launcher, and the report across them.

    toylens-train -m seed=0,1,2,3 experiment=no_pos_prev_token hydra/launcher=joblib
    toylens-sweep-report checkpoints/no_pos_prev_token/multirun/<time>

``index`` (per-run records and ``sweep.json``), ``job`` (what each job does: skip, resume, record),
``callback`` (the Hydra callback that writes the index and sets the exit code), ``report`` and
``report_page`` (``toylens-sweep-report``), ``cli``.
"""
