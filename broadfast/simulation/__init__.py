"""Simulations, named as such wherever a user sees them: the frontend's traffic replay, the click
model and the oracle annotator (human judgements standing in for an LLM teacher)."""
