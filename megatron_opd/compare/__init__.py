"""``opd compare``: the papers' comparison of objectives, in miniature — every objective trained on the same
task with the same sample budget and seeds, then held-out accuracy, the share of the student–teacher gap
closed and the exact reverse KL to the teacher, as a table (markdown + JSON) and a PNG of the curves.

``runs`` plans and runs one ``opd train`` per (objective, seed); ``heldout_kl`` measures the reverse KL on
held-out prompts; ``report`` aggregates over seeds and writes the outputs; ``cli`` is the command.
See docs/results.md."""
