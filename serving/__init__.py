"""serving: the scoring API (``broadfast serve``), micro-batching, hot swap and A/B rollouts.

One concern per module: :mod:`serving.app` (HTTP), :mod:`serving.engine` (routing, swaps,
background threads), :mod:`serving.batcher` (micro-batching), :mod:`serving.models`
(loading and checking versions), :mod:`serving.scoredlog` (scored events),
:mod:`serving.experiments` (the A/B store), :mod:`serving.rollout` (rollout operations),
:mod:`serving.metrics`, :mod:`serving.server` (uvicorn). See docs/serving.md.
"""
