"""The model tests share the training tests' fixtures (real pairs, synthetic teacher labels, one torch thread)."""

from tests.training.conftest import _one_torch_thread, labels_file, pairs  # noqa: F401
