"""monitoring: Evidently drift reports, A/B comparisons with guardrails, the Evidently UI.

See ``docs/monitoring.md``. Entry points: :func:`broadfast.monitoring.drift.drift_report`,
:func:`broadfast.monitoring.ab.compare`, :class:`broadfast.monitoring.monitor.Monitor`, and the commands
``broadfast drift`` / ``monitor`` / ``ui`` (``broadfast/cli/monitoring.py``).
"""
