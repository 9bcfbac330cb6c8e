"""Versions that must agree across processes; torch-free so the gateway can import it."""

# Embedding payload format (shared/codec.py). It is part of every cache key, so a format change
# never reads an old entry.
PAYLOAD_FORMAT = 2  # v2: the payload names its image (image id)
