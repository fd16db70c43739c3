"""Luxima Backup: backup, restore and disaster recovery of the Luxima Core Platform."""

__version__ = "0.1.0"
