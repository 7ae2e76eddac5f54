"""The student (network, checkpoint format, embedder) and the model registry: what training publishes
and serving loads."""
