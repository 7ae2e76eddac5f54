"""The command tests use the fixtures of the packages whose commands they run."""

from tests.monitoring.conftest import crowdflower_dev, homedepot_dev, homedepot_train  # noqa: F401
from tests.training.conftest import _one_torch_thread, labels_file, pairs  # noqa: F401
