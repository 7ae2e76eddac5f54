"""Training: the student, distillation losses and trainers, the teacher, the model registry."""
