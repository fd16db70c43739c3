"""Prefect flows: one per backup component and restore procedure."""

from luxima_backup import prefect_compat

# Every flow run of ours, wherever it runs (the CLI, a worker's flow-run process, serve), ends as soon
# as its work is done (see prefect_compat).
prefect_compat.quick_heartbeat_exit()
