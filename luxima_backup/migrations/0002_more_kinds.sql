-- Runs that are neither a backup nor a restore: retention (prune, and the sweep of what no backup
-- owns), replication to the DR site, DR drills; and the components those and container images add.
-- Idempotent: the checks are replaced whole.

ALTER TABLE internal.backup_logs DROP CONSTRAINT IF EXISTS backup_logs_kind_check;
ALTER TABLE internal.backup_logs ADD CONSTRAINT backup_logs_kind_check
    CHECK (kind IN ('backup', 'restore', 'verify', 'prune', 'sweep', 'replicate', 'drill'));

ALTER TABLE internal.backup_logs DROP CONSTRAINT IF EXISTS backup_logs_component_check;
ALTER TABLE internal.backup_logs ADD CONSTRAINT backup_logs_component_check
    CHECK (component IN ('db', 'files', 'configs', 'vm', 'images', 'storage'));
