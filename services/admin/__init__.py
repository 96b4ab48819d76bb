"""Operator commands: topics, dead letters."""
