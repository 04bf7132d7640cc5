"""Shipped run configs (YAML)."""
