"""The development stack: a Kafka-protocol broker (Tansu) and Redis on loopback, for one machine."""
