"""Training: distillation losses and the offline trainer, the online learner, its gate and loop,
shrinking a student (the student itself and the registry are in :mod:`broadfast.model`)."""
