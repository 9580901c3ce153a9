"""``opd selftest``: what to run on a new GPU node before a long job (see ``docs/gpu.md``)."""
