"""The objectives of docs/objectives.md: ``registry.build_objective(cfg)`` returns a :class:`base.Objective`
(``opd``, ``gopd``, ``exopd``, ``aopd``, ``lsm``, ``gkd``, ``sft``) that turns an :class:`inputs.TokenBatch`
into a micro-batch loss and metrics; ``inputs`` holds what an objective requires of scoring and builds its
token batch from the scores; ``aggregation`` weights tokens over the global batch, ``rollout_correction``
implements §6, ``reference`` is the plain full-vocabulary version for tests and reading."""
