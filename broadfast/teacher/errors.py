"""Errors of the teacher (subclasses of the project's root error)."""

from __future__ import annotations

from broadfast.core.errors import BroadfastError, ConfigError, DataError


class TeacherError(BroadfastError):
    """Something about the teacher failed."""


class TemplateError(TeacherError, ConfigError):
    """A prompt template or the rules file is missing or invalid."""


class TeacherUnavailable(TeacherError):
    """The teacher cannot be reached at all (server down, model missing): nothing was labelled.

    The worker does not commit offsets when this happens, so the hard cases are read again.
    """


class LabelDataError(TeacherError, DataError):
    """A file of pairs or labels lacks what labelling or teacher training needs."""
