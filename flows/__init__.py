"""Prefect flows: one per backup component and restore procedure."""
