"""coreloop's machine-learning library: data, models, training, pool scoring, selection.

Deliberately exports nothing: ``ml.selection`` and ``ml.kcenter`` are numpy-only, and importing
the package must not pull in torch for code (the API) that needs only those.
"""
