"""The docstring examples of broadfast/features/. pytest's ``--doctest-modules`` leaves that package out
(pyproject.toml), so that no collection ever imports the Feast definitions of ``feature_repo/``; its
library modules' examples run here instead."""

from __future__ import annotations

import doctest

import pytest

from broadfast.features import config, definitions


@pytest.mark.parametrize("module", [config, definitions], ids=lambda m: m.__name__)
def test_the_docstring_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no examples left to run"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module.__name__} failed"
