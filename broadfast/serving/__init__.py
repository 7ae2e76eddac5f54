"""serving: the scoring API (``broadfast serve``), micro-batching, hot swap and A/B rollouts.

One concern per module: :mod:`broadfast.serving.app` (HTTP), :mod:`broadfast.serving.engine` (routing, swaps,
background threads), :mod:`broadfast.serving.batcher` (micro-batching), :mod:`broadfast.serving.models`
(loading and checking versions), :mod:`broadfast.serving.scoredlog` (scored events),
:mod:`broadfast.core.experiments` (the A/B store), :mod:`broadfast.serving.rollout` (rollout operations),
:mod:`broadfast.serving.metrics`, :mod:`broadfast.serving.server` (uvicorn). See docs/serving.md.
"""
