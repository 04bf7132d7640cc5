"""The iterative loop: round 0 trains the real-only classifier; each round mines its mistakes, inverts
them, makes filtered variants and retrains, beside the classical-augmentation and random-synthetic
baselines (same seeds, same counts). Resumable at stage granularity (`lesiongen.runs`).

Modules: `config` (the run config), `layout` (where stages live), `plan` (the ordered stages),
`stages` (calls into the library), `classical` (the classical-augmentation arm), `prompted` (class-
prompted sets: the random arm and rare classes), `run` (start / resume), `summary` (RUN/metrics.json),
`progress`, `demo`.
"""
