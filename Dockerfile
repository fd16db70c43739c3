# The backup-agent image: a Prefect process worker for the luxima-backup work pool, with the
# PostgreSQL client tools the flows run (pg_dump, pg_dumpall, pg_restore, psql).
#
#   docker build -t luxima/backup-agent .
#   docker run -d --name backup-agent \
#     -e PREFECT_API_URL=http://prefect.internal:4200/api \
#     -e LUXIMA_BACKUP_CONFIG=/etc/luxima-backup/luxima-backup.toml \
#     -e VAULT_ROLE_ID=... -e VAULT_SECRET_ID=... \
#     -v /etc/luxima-backup:/etc/luxima-backup:ro -v luxima-work:/var/lib/luxima-backup \
#     luxima/backup-agent
#
# pg_dump must be at least as new as the server: the image carries clients 15, 16 and 17 from
# the PostgreSQL project's apt repository, and the flows pick the one matching each server.
FROM python:3.11-slim-bookworm

ARG PG_CLIENTS="15 16 17"
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl gnupg zstd openssh-client rsync git; \
    install -d /usr/share/postgresql-common/pgdg; \
    curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc; \
    echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
        > /etc/apt/sources.list.d/pgdg.list; \
    apt-get update; \
    apt-get install -y --no-install-recommends $(for v in $PG_CLIENTS; do echo postgresql-client-$v; done); \
    apt-get purge -y gnupg; apt-get autoremove -y; rm -rf /var/lib/apt/lists/*

WORKDIR /opt/luxima-backup
COPY requirements.lock pyproject.toml ./
RUN pip install --no-cache-dir -r requirements.lock
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
    && useradd --system --home-dir /var/lib/luxima-backup --create-home luxima \
    && chmod 0700 /var/lib/luxima-backup

ENV LUXIMA_BACKUP_HOME=/opt/luxima-backup \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1
USER luxima
CMD ["luxima-backup", "worker", "--pool", "luxima-backup"]
