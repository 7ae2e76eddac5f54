"""monitoring: Evidently drift reports, A/B comparisons with guardrails, the Evidently UI.

See ``docs/monitoring.md``. Entry points: :func:`monitoring.drift.drift_report`,
:func:`monitoring.ab.compare`, :class:`monitoring.monitor.Monitor`, and the commands
``broadfast drift`` / ``monitor`` / ``ui`` (``monitoring/commands.py``).
"""
