"""The objectives of OBJECTIVES.md: ``registry.build_objective(cfg)`` returns an :class:`base.Objective`
(``opd``, ``gopd``, ``exopd``, ``aopd``, ``lsm``, ``gkd``, ``sft``) that turns a :class:`base.TokenBatch`
into a micro-batch loss and metrics; ``aggregation`` weights tokens over the global batch,
``rollout_correction`` implements §6, ``reference`` is the plain full-vocabulary version for tests and
reading. See docs/objectives.md."""
