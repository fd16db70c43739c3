"""Stage modules: plain streaming functions over file objects, each with a thin Prefect ``@task``."""
