"""Multimodal input: media fetched and decoded for vision (and later other) models."""
