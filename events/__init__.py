"""Shared kernel: envelope, Avro codec, topic catalog, configuration, Kafka helpers."""
