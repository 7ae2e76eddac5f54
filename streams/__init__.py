"""Streams: topic names and event contracts, the Kafka bus, dead letters, traffic replay
and the embedded local stack (and, later, the faust app and the labeling worker)."""
