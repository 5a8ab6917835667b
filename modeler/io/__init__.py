"""The modeler's edges: Kafka planning, reading and decoding, and Redis publishing."""
