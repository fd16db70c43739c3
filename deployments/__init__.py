"""Deployment, block and alert registration (see prefect.yaml for the schedules)."""
