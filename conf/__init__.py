"""Hydra configuration: the typed schema (schema.py) and the config groups (YAML)."""
