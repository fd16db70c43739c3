"""The application layer: the ``luxima-backup`` command. It sits above flows, tasks and deployments and
imports them; nothing below imports it."""
