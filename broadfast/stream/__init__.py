"""The stream worker (``broadfast stream``): a faust app that scores hardness, samples hard cases
within the labelling budget and keeps the impression/click counters (see docs/stream.md)."""
