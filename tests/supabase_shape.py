"""A database shaped like a Supabase project's ``postgres`` database, on a plain PostgreSQL 15.

Supabase's own extensions (pg_graphql, pgsodium, supabase_vault, pg_net, pg_cron) are not available,
so their schemas exist with stand-ins; pgcrypto and "uuid-ossp" are real. Roles, schema owners, grants,
default privileges, RLS policies, event triggers and the realtime publication follow what Supabase's
images set up (supabase/postgres ``migrations/db``; the Supabase CLI's initial-schema templates).

Roles are cluster-wide: ``create_supabase_roles`` is idempotent, so tests sharing a cluster may call it
for every database. ``make_supabase_db`` then fills one fresh database.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

# --- What the Supabase CLI leaves out (supabase/cli apps/cli-go/pkg/migration/dump.go) ----------------
# pg_dump patterns (``*`` as in pg_dump). ``supabase db dump`` (schema) excludes these schemas:
CLI_SCHEMA_DUMP_EXCLUDED = [
    "information_schema", "pg_*",
    "_analytics", "_realtime", "_supavisor", "auth", "etl", "extensions", "pgbouncer", "realtime", "storage",
    "supabase_functions", "supabase_migrations",
    "cron", "dbdev", "graphql", "graphql_public", "net", "pgmq", "pgsodium", "pgsodium_masks", "pgtle", "repack",
    "tiger", "tiger_data", "timescaledb_*", "_timescaledb_*", "topology", "vault",
]
# ``supabase db dump --data-only`` excludes these schemas (auth, storage, supabase_functions, cron, net and
# pgmq data ARE dumped, for migrating to a new project) ...
CLI_DATA_DUMP_EXCLUDED = [
    "information_schema", "pg_*",
    "graphql", "graphql_public", "pgsodium", "pgsodium_masks", "pgtle", "repack", "tiger", "tiger_data",
    "timescaledb_*", "_timescaledb_*", "topology", "vault",
    "etl", "extensions", "pgbouncer", "realtime", "supabase_migrations",
    "_analytics", "_realtime", "_supavisor",
]
# ... and these tables (migration histories kept by the platform services):
CLI_DATA_DUMP_EXCLUDED_TABLES = ["auth.schema_migrations", "storage.migrations", "supabase_functions.migrations"]
# ``supabase db dump --role-only`` (pg_dumpall --roles-only) comments out CREATE/ALTER ROLE of these
# (regular expressions) and GRANTs of any role to them:
CLI_RESERVED_ROLES = [
    "anon", "authenticated", "authenticator", "cli_login_.*", "dashboard_user", "pgbouncer", "postgres",
    "service_role", "supabase_.*", "pgsodium_keyholder", "pgsodium_keyiduser", "pgsodium_keymaker", "pgtle_admin",
]

# Schemas make_supabase_db creates besides public, all managed by the platform, with their owners.
SUPABASE_SCHEMA_OWNERS = {
    "auth": "supabase_admin",
    "storage": "supabase_admin",
    "realtime": "supabase_admin",
    "extensions": "postgres",
    "graphql": "supabase_admin",
    "graphql_public": "supabase_admin",
    "vault": "supabase_admin",
    "pgbouncer": "pgbouncer",
    "supabase_functions": "supabase_admin",
    "supabase_migrations": "postgres",  # created by the CLI's migration runner, as postgres
}
SUPABASE_MANAGED_SCHEMAS = list(SUPABASE_SCHEMA_OWNERS)

API_ROLES = ["anon", "authenticated", "service_role"]
# Roles with (attributes, settings); members are granted below. As after all of supabase/postgres's
# migrations (anon, authenticated, service_role became INHERIT in 20230529180330).
SUPABASE_ROLES: dict[str, tuple[str, dict[str, str]]] = {
    "supabase_admin": ("SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS LOGIN",
                       {"search_path": '"$user", public, auth, extensions'}),
    "supabase_replication_admin": ("LOGIN REPLICATION", {}),
    "supabase_read_only_user": ("LOGIN BYPASSRLS", {}),
    "anon": ("NOLOGIN INHERIT", {"statement_timeout": "'3s'"}),
    "authenticated": ("NOLOGIN INHERIT", {"statement_timeout": "'8s'"}),
    "service_role": ("NOLOGIN INHERIT BYPASSRLS", {}),
    "authenticator": ("LOGIN NOINHERIT", {"statement_timeout": "'8s'", "lock_timeout": "'8s'"}),
    "supabase_auth_admin": ("LOGIN NOINHERIT CREATEROLE NOREPLICATION",
                            {"search_path": "auth", "idle_in_transaction_session_timeout": "60000"}),
    "supabase_storage_admin": ("LOGIN NOINHERIT CREATEROLE NOREPLICATION", {"search_path": "storage"}),
    "supabase_functions_admin": ("LOGIN NOINHERIT CREATEROLE NOREPLICATION", {"search_path": "supabase_functions"}),
    "supabase_realtime_admin": ("NOLOGIN NOINHERIT NOCREATEROLE NOCREATEDB NOBYPASSRLS", {}),
    "dashboard_user": ("NOLOGIN NOSUPERUSER CREATEDB CREATEROLE REPLICATION", {}),
    "pgbouncer": ("LOGIN", {}),
}
SUPABASE_MEMBERSHIPS = [  # (role, member)
    ("pg_read_all_data", "supabase_read_only_user"),
    ("anon", "authenticator"), ("authenticated", "authenticator"), ("service_role", "authenticator"),
    ("authenticator", "supabase_storage_admin"),
    # postgres is not a superuser on Supabase; these give it its powers there.
    ("anon", "postgres"), ("authenticated", "postgres"), ("service_role", "postgres"),
    ("supabase_auth_admin", "postgres"), ("supabase_storage_admin", "postgres"),
    ("supabase_functions_admin", "postgres"),
    ("pg_read_all_data", "postgres"), ("pg_signal_backend", "postgres"), ("pg_monitor", "postgres"),
]
LOGIN_ROLES = [name for name, (attrs, _) in SUPABASE_ROLES.items() if " LOGIN" in f" {attrs}" and "NOLOGIN" not in attrs]


def _roles_sql() -> str:
    body = ["PERFORM pg_advisory_xact_lock(hashtext('luxima supabase roles'));"]
    for name, (attrs, settings) in SUPABASE_ROLES.items():
        body.append(
            f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN\n"
            f"    BEGIN CREATE ROLE {name} {attrs};\n"
            f"    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END;\n"
            f"  END IF;")
        for key, value in settings.items():
            body.append(f"ALTER ROLE {name} SET {key} = {value};")
    for role, member in SUPABASE_MEMBERSHIPS:
        body.append(  # not pg_has_role(): it is always true for a superuser
            f"IF NOT EXISTS (SELECT FROM pg_auth_members WHERE roleid = '{role}'::regrole"
            f" AND member = '{member}'::regrole) THEN GRANT {role} TO {member}; END IF;")
    return "DO $roles$\nBEGIN\n  " + "\n  ".join(body) + "\nEND\n$roles$;\n"


# One DO block: safe to run again, and in many databases of one cluster.
SUPABASE_ROLES_SQL = _roles_sql()


def create_supabase_roles(conn: Any, password: str | None = None) -> None:
    """Create (if missing) Supabase's cluster-wide roles; with ``password``, set it on the LOGIN roles."""
    conn.execute(SUPABASE_ROLES_SQL)
    if password is not None:
        for name in LOGIN_ROLES:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))


JWT_SECRET = "luxima-test-jwt-secret-with-at-least-32-characters"

USER_IDS = [
    "0b1f6c3e-1a2b-4c3d-8e9f-000000000001",
    "0b1f6c3e-1a2b-4c3d-8e9f-000000000002",
    "0b1f6c3e-1a2b-4c3d-8e9f-000000000003",
]


def make_supabase_db(conn: Any, dbname: str, *, app: bool = True, rows: bool = True,
                     jwt_secret: str = JWT_SECRET, jwt_exp: int = 3600) -> None:
    """Make the fresh database ``dbname`` (``conn`` is a superuser connected to it) look like Supabase's.

    The platform part: managed schemas with their owners, extensions, auth/storage/realtime/functions
    tables, ``auth.uid()``/``role()``/``email()``/``jwt()``, RLS and policies on storage, event triggers,
    the ``supabase_realtime`` publication, grants, default privileges and ``app.settings.jwt_*``.
    With ``app``: the application's public tables (profiles referencing auth.users with policies using
    ``auth.uid()``, todos, a trigger on auth.users). With ``rows``: rows in all of them.
    The Supabase roles must exist (``create_supabase_roles``).
    """
    db = sql.Identifier(dbname)
    conn.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
        db, sql.Identifier("app.settings.jwt_secret"), sql.Literal(jwt_secret)))
    conn.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
        db, sql.Identifier("app.settings.jwt_exp"), sql.Literal(str(jwt_exp))))
    conn.execute(sql.SQL("GRANT ALL ON DATABASE {} TO postgres, dashboard_user").format(db))
    conn.execute(sql.SQL("GRANT CREATE, CONNECT ON DATABASE {} TO supabase_auth_admin, supabase_storage_admin,"
                         " supabase_functions_admin, supabase_realtime_admin").format(db))
    for schema, owner in SUPABASE_SCHEMA_OWNERS.items():
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(schema), sql.Identifier(owner)))
    conn.execute(_PLATFORM_SQL)
    conn.execute(_AUTH_SQL)
    conn.execute(_STORAGE_SQL)
    conn.execute(_REALTIME_FUNCTIONS_MIGRATIONS_SQL)
    conn.execute(_EVENT_TRIGGERS_SQL)
    if app:
        conn.execute(_APP_SQL)
    if rows:
        _insert_rows(conn, app)


_PLATFORM_SQL = """
CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA extensions;
CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA extensions;

GRANT USAGE ON SCHEMA public TO postgres, anon, authenticated, service_role;
GRANT USAGE ON SCHEMA extensions TO postgres, anon, authenticated, service_role;
GRANT ALL ON SCHEMA extensions TO dashboard_user;
GRANT ALL ON ALL ROUTINES IN SCHEMA extensions TO postgres, dashboard_user;  -- ACLs on extension members

-- New objects in public are open to the API roles; RLS does the filtering.
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;

GRANT USAGE ON SCHEMA graphql_public TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA graphql_public GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
GRANT USAGE ON SCHEMA graphql TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA graphql GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;

-- pg_graphql is not installed: the public entry point answers with an error, as Supabase's placeholder does.
CREATE FUNCTION graphql_public.graphql("operationName" text DEFAULT NULL, query text DEFAULT NULL,
                                       variables jsonb DEFAULT NULL, extensions jsonb DEFAULT NULL)
RETURNS jsonb LANGUAGE sql STABLE AS $fn$
    SELECT jsonb_build_object('errors', jsonb_build_array(
        jsonb_build_object('message', 'the pg_graphql extension is not installed')))
$fn$;
ALTER FUNCTION graphql_public.graphql(text, text, jsonb, jsonb) OWNER TO supabase_admin;
GRANT ALL ON FUNCTION graphql_public.graphql(text, text, jsonb, jsonb) TO postgres, anon, authenticated, service_role;

-- supabase_vault is not installed: a plain stand-in for its secrets table.
CREATE TABLE vault.secrets (
    id uuid PRIMARY KEY DEFAULT extensions.gen_random_uuid(),
    name text UNIQUE,
    description text NOT NULL DEFAULT '',
    secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE vault.secrets OWNER TO supabase_admin;
GRANT USAGE ON SCHEMA vault TO postgres, service_role;
GRANT SELECT, DELETE ON vault.secrets TO postgres, service_role;

-- Supavisor/PgBouncer's auth lookup.
CREATE FUNCTION pgbouncer.get_auth(p_usename text) RETURNS TABLE(username text, password text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
    SELECT usename::text, passwd::text FROM pg_catalog.pg_shadow WHERE usename = p_usename
$fn$;
ALTER FUNCTION pgbouncer.get_auth(text) OWNER TO postgres;
REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer;

CREATE PUBLICATION supabase_realtime;
"""

_AUTH_SQL = """
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role, postgres;
GRANT ALL ON SCHEMA auth TO supabase_auth_admin, dashboard_user;

CREATE TABLE auth.users (
    instance_id uuid,
    id uuid NOT NULL PRIMARY KEY,
    aud varchar(255),
    role varchar(255),
    email varchar(255),
    encrypted_password varchar(255),
    email_confirmed_at timestamptz,
    invited_at timestamptz,
    confirmation_token varchar(255),
    recovery_token varchar(255),
    last_sign_in_at timestamptz,
    raw_app_meta_data jsonb,
    raw_user_meta_data jsonb,
    is_super_admin boolean,
    created_at timestamptz,
    updated_at timestamptz,
    phone text UNIQUE DEFAULT NULL,
    banned_until timestamptz,
    deleted_at timestamptz,
    is_anonymous boolean NOT NULL DEFAULT false,
    confirmed_at timestamptz GENERATED ALWAYS AS (email_confirmed_at) STORED
);
CREATE UNIQUE INDEX users_email_partial_key ON auth.users (email) WHERE is_anonymous = false;
COMMENT ON TABLE auth.users IS 'Auth: Stores user login data within a secure schema.';

CREATE TABLE auth.identities (
    provider_id text NOT NULL,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    identity_data jsonb NOT NULL,
    provider text NOT NULL,
    last_sign_in_at timestamptz,
    created_at timestamptz,
    updated_at timestamptz,
    email text GENERATED ALWAYS AS (lower(identity_data ->> 'email')) STORED,
    id uuid NOT NULL DEFAULT extensions.gen_random_uuid() PRIMARY KEY,
    UNIQUE (provider_id, provider)
);

CREATE TYPE auth.aal_level AS ENUM ('aal1', 'aal2', 'aal3');
CREATE TABLE auth.sessions (
    id uuid NOT NULL PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at timestamptz,
    updated_at timestamptz,
    aal auth.aal_level,
    not_after timestamptz,
    user_agent text,
    ip inet
);

CREATE TABLE auth.refresh_tokens (
    instance_id uuid,
    id bigserial PRIMARY KEY,
    token varchar(255) UNIQUE,
    user_id varchar(255),
    revoked boolean,
    created_at timestamptz,
    updated_at timestamptz,
    parent varchar(255),
    session_id uuid REFERENCES auth.sessions (id) ON DELETE CASCADE
);

CREATE TABLE auth.audit_log_entries (
    instance_id uuid,
    id uuid NOT NULL PRIMARY KEY,
    payload json,
    created_at timestamptz,
    ip_address varchar(64) NOT NULL DEFAULT ''
);

CREATE TABLE auth.schema_migrations (version varchar(255) NOT NULL PRIMARY KEY);

-- The JWT helpers PostgREST requests rely on (both the old per-claim and the newer JSON settings).
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid
$fn$;
CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')::text
$fn$;
CREATE FUNCTION auth.email() RETURNS text LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.email', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')::text
$fn$;
CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                    nullif(current_setting('request.jwt.claims', true), ''))::jsonb
$fn$;
COMMENT ON FUNCTION auth.uid() IS 'Deprecated. Use auth.jwt() -> ''sub'' instead.';

ALTER TABLE auth.users OWNER TO supabase_auth_admin;
ALTER TABLE auth.identities OWNER TO supabase_auth_admin;
ALTER TYPE auth.aal_level OWNER TO supabase_auth_admin;
ALTER TABLE auth.sessions OWNER TO supabase_auth_admin;
ALTER TABLE auth.refresh_tokens OWNER TO supabase_auth_admin;
ALTER TABLE auth.audit_log_entries OWNER TO supabase_auth_admin;
ALTER TABLE auth.schema_migrations OWNER TO supabase_auth_admin;
ALTER FUNCTION auth.uid() OWNER TO supabase_auth_admin;
ALTER FUNCTION auth.role() OWNER TO supabase_auth_admin;
ALTER FUNCTION auth.email() OWNER TO supabase_auth_admin;
ALTER FUNCTION auth.jwt() OWNER TO supabase_auth_admin;

GRANT ALL ON ALL TABLES IN SCHEMA auth TO postgres, dashboard_user;
GRANT ALL ON ALL SEQUENCES IN SCHEMA auth TO postgres, dashboard_user;
GRANT ALL ON ALL ROUTINES IN SCHEMA auth TO postgres, dashboard_user;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA auth TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_auth_admin IN SCHEMA auth GRANT ALL ON TABLES TO postgres, dashboard_user;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_auth_admin IN SCHEMA auth GRANT ALL ON SEQUENCES TO postgres, dashboard_user;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_auth_admin IN SCHEMA auth GRANT ALL ON ROUTINES TO postgres, dashboard_user;
"""

_STORAGE_SQL = """
GRANT USAGE ON SCHEMA storage TO postgres, anon, authenticated, service_role;
GRANT ALL ON SCHEMA storage TO supabase_storage_admin, dashboard_user;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA storage GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA storage GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA storage GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;

CREATE TABLE storage.buckets (
    id text NOT NULL PRIMARY KEY,
    name text NOT NULL,
    owner uuid,
    public boolean DEFAULT false,
    file_size_limit bigint,
    allowed_mime_types text[],
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);
CREATE UNIQUE INDEX bname ON storage.buckets (name);

CREATE TABLE storage.objects (
    id uuid NOT NULL DEFAULT extensions.uuid_generate_v4() PRIMARY KEY,
    bucket_id text REFERENCES storage.buckets (id),
    name text,
    owner uuid,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    last_accessed_at timestamptz DEFAULT now(),
    metadata jsonb,
    path_tokens text[] GENERATED ALWAYS AS (string_to_array(name, '/')) STORED,
    version text
);
CREATE UNIQUE INDEX bucketid_objname ON storage.objects (bucket_id, name);
CREATE INDEX name_prefix_search ON storage.objects (name text_pattern_ops);

CREATE TABLE storage.migrations (
    id integer PRIMARY KEY,
    name varchar(100) UNIQUE NOT NULL,
    hash varchar(40) NOT NULL,
    executed_at timestamp DEFAULT current_timestamp
);

CREATE FUNCTION storage.foldername(name text) RETURNS text[] LANGUAGE sql IMMUTABLE AS $fn$
    SELECT (string_to_array(name, '/'))[1:cardinality(string_to_array(name, '/')) - 1]
$fn$;
CREATE FUNCTION storage.filename(name text) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
    SELECT (string_to_array(name, '/'))[cardinality(string_to_array(name, '/'))]
$fn$;
CREATE FUNCTION storage.extension(name text) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE WHEN storage.filename(name) LIKE '%.%'
                THEN reverse(split_part(reverse(storage.filename(name)), '.', 1)) ELSE '' END
$fn$;

ALTER TABLE storage.buckets ENABLE ROW LEVEL SECURITY;
ALTER TABLE storage.objects ENABLE ROW LEVEL SECURITY;
ALTER TABLE storage.migrations ENABLE ROW LEVEL SECURITY;

CREATE POLICY "Public buckets are readable" ON storage.objects FOR SELECT TO anon, authenticated
    USING (bucket_id IN (SELECT b.id FROM storage.buckets b WHERE b.public));
CREATE POLICY "Users read their own files" ON storage.objects FOR SELECT TO authenticated
    USING (owner = auth.uid());
CREATE POLICY "Users upload into their own folder" ON storage.objects FOR INSERT TO authenticated
    WITH CHECK (bucket_id = 'avatars' AND (storage.foldername(name))[1] = auth.uid()::text);
CREATE POLICY "Users delete their own files" ON storage.objects FOR DELETE TO authenticated
    USING (owner = auth.uid());
CREATE POLICY "Buckets are listable" ON storage.buckets FOR SELECT TO anon, authenticated USING (true);

ALTER TABLE storage.buckets OWNER TO supabase_storage_admin;
ALTER TABLE storage.objects OWNER TO supabase_storage_admin;
ALTER TABLE storage.migrations OWNER TO supabase_storage_admin;
ALTER FUNCTION storage.foldername(text) OWNER TO supabase_storage_admin;
ALTER FUNCTION storage.filename(text) OWNER TO supabase_storage_admin;
ALTER FUNCTION storage.extension(text) OWNER TO supabase_storage_admin;

GRANT ALL ON storage.buckets, storage.objects TO postgres, anon, authenticated, service_role;
GRANT ALL ON storage.migrations TO postgres, anon, authenticated, service_role;
GRANT ALL ON ALL ROUTINES IN SCHEMA storage TO postgres, anon, authenticated, service_role, dashboard_user;
"""

_REALTIME_FUNCTIONS_MIGRATIONS_SQL = """
GRANT USAGE ON SCHEMA realtime TO postgres, anon, authenticated, service_role, supabase_realtime_admin;
GRANT ALL ON SCHEMA realtime TO supabase_realtime_admin;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA realtime GRANT ALL ON TABLES TO postgres, dashboard_user;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA realtime GRANT ALL ON SEQUENCES TO postgres, dashboard_user;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA realtime GRANT ALL ON ROUTINES TO postgres, dashboard_user;

-- Broadcast/presence messages: partitioned by day on inserted_at, as Realtime does.
CREATE TABLE realtime.messages (
    topic text NOT NULL,
    extension text NOT NULL,
    payload jsonb,
    event text,
    private boolean DEFAULT false,
    updated_at timestamp NOT NULL DEFAULT now(),
    inserted_at timestamp NOT NULL DEFAULT now(),
    id uuid NOT NULL DEFAULT extensions.gen_random_uuid(),
    PRIMARY KEY (id, inserted_at)
) PARTITION BY RANGE (inserted_at);
CREATE TABLE realtime.messages_2024_06_01 PARTITION OF realtime.messages
    FOR VALUES FROM ('2024-06-01') TO ('2024-06-02');
CREATE TABLE realtime.messages_2024_06_02 PARTITION OF realtime.messages
    FOR VALUES FROM ('2024-06-02') TO ('2024-06-03');
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Authenticated users receive broadcasts" ON realtime.messages FOR SELECT TO authenticated
    USING (extension = 'broadcast');
ALTER TABLE realtime.messages OWNER TO supabase_realtime_admin;
ALTER TABLE realtime.messages_2024_06_01 OWNER TO supabase_realtime_admin;
ALTER TABLE realtime.messages_2024_06_02 OWNER TO supabase_realtime_admin;
GRANT SELECT, INSERT, UPDATE ON realtime.messages TO postgres, anon, authenticated, service_role;

CREATE TABLE realtime.schema_migrations (version bigint NOT NULL PRIMARY KEY, inserted_at timestamp(0));
ALTER TABLE realtime.schema_migrations OWNER TO supabase_admin;

-- Database webhooks.
GRANT USAGE ON SCHEMA supabase_functions TO postgres, anon, authenticated, service_role;
GRANT ALL ON SCHEMA supabase_functions TO supabase_functions_admin;
CREATE TABLE supabase_functions.migrations (version text NOT NULL PRIMARY KEY, inserted_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE supabase_functions.hooks (
    id bigserial PRIMARY KEY,
    hook_table_id integer NOT NULL,
    hook_name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    request_id bigint
);
CREATE INDEX supabase_functions_hooks_h_table_id_h_name_idx ON supabase_functions.hooks (hook_table_id, hook_name);
COMMENT ON TABLE supabase_functions.hooks IS 'Supabase Functions Hooks: Audit trail for triggered hooks.';
ALTER TABLE supabase_functions.migrations OWNER TO supabase_functions_admin;
ALTER TABLE supabase_functions.hooks OWNER TO supabase_functions_admin;
GRANT ALL ON ALL TABLES IN SCHEMA supabase_functions TO postgres, anon, authenticated, service_role;
GRANT ALL ON ALL SEQUENCES IN SCHEMA supabase_functions TO postgres, anon, authenticated, service_role;

-- The CLI's migration history (``supabase db push``).
CREATE TABLE supabase_migrations.schema_migrations (version text NOT NULL PRIMARY KEY, statements text[], name text);
CREATE TABLE supabase_migrations.seed_files (path text NOT NULL PRIMARY KEY, hash text NOT NULL);
"""

# Supabase's event triggers, as harmless no-ops here: each acts only when the extension or schema it
# watches (pg_cron, pg_net, pg_graphql) appears, which never happens on plain PostgreSQL, and none can fail
# on other DDL. The pgrst_* ones tell PostgREST to reload its schema cache (a NOTIFY nobody listens to).
_EVENT_TRIGGERS_SQL = """
CREATE FUNCTION extensions.grant_pg_cron_access() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() ev JOIN pg_namespace n ON n.oid = ev.objid
               WHERE n.nspname = 'cron') THEN
        EXECUTE 'GRANT USAGE ON SCHEMA cron TO postgres WITH GRANT OPTION';
    END IF;
END
$fn$;
COMMENT ON FUNCTION extensions.grant_pg_cron_access() IS 'Grants access to pg_cron';

CREATE FUNCTION extensions.grant_pg_net_access() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() ev JOIN pg_extension e ON e.oid = ev.objid
               WHERE e.extname = 'pg_net') THEN
        EXECUTE 'GRANT USAGE ON SCHEMA net TO supabase_functions_admin, postgres, anon, authenticated, service_role';
    END IF;
END
$fn$;
COMMENT ON FUNCTION extensions.grant_pg_net_access() IS 'Grants access to pg_net';

CREATE FUNCTION extensions.grant_pg_graphql_access() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() ev JOIN pg_proc p ON p.oid = ev.objid
               JOIN pg_namespace n ON n.oid = p.pronamespace
               WHERE n.nspname = 'graphql' AND p.proname = 'resolve') THEN
        EXECUTE 'GRANT USAGE ON SCHEMA graphql TO postgres, anon, authenticated, service_role';
    END IF;
END
$fn$;
COMMENT ON FUNCTION extensions.grant_pg_graphql_access() IS 'Grants access to pg_graphql';

CREATE FUNCTION extensions.set_graphql_placeholder() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_dropped_objects() ev
               WHERE ev.object_type = 'extension' AND ev.object_identity = 'pg_graphql') THEN
        RAISE NOTICE 'pg_graphql dropped: graphql_public.graphql stays a placeholder';
    END IF;
END
$fn$;
COMMENT ON FUNCTION extensions.set_graphql_placeholder() IS 'Reintroduces placeholder function for graphql_public.graphql';

CREATE FUNCTION extensions.pgrst_ddl_watch() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() ev
               WHERE ev.schema_name IS DISTINCT FROM 'pg_temp') THEN
        NOTIFY pgrst, 'reload schema';
    END IF;
END
$fn$;

CREATE FUNCTION extensions.pgrst_drop_watch() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_dropped_objects() ev WHERE ev.is_temporary IS NOT TRUE) THEN
        NOTIFY pgrst, 'reload schema';
    END IF;
END
$fn$;

ALTER FUNCTION extensions.grant_pg_cron_access() OWNER TO supabase_admin;
ALTER FUNCTION extensions.grant_pg_net_access() OWNER TO supabase_admin;
ALTER FUNCTION extensions.grant_pg_graphql_access() OWNER TO supabase_admin;
ALTER FUNCTION extensions.set_graphql_placeholder() OWNER TO supabase_admin;
ALTER FUNCTION extensions.pgrst_ddl_watch() OWNER TO supabase_admin;
ALTER FUNCTION extensions.pgrst_drop_watch() OWNER TO supabase_admin;

CREATE EVENT TRIGGER issue_pg_cron_access ON ddl_command_end WHEN TAG IN ('CREATE EXTENSION', 'CREATE SCHEMA')
    EXECUTE FUNCTION extensions.grant_pg_cron_access();
CREATE EVENT TRIGGER issue_pg_net_access ON ddl_command_end WHEN TAG IN ('CREATE EXTENSION')
    EXECUTE FUNCTION extensions.grant_pg_net_access();
CREATE EVENT TRIGGER issue_pg_graphql_access ON ddl_command_end WHEN TAG IN ('CREATE FUNCTION')
    EXECUTE FUNCTION extensions.grant_pg_graphql_access();
CREATE EVENT TRIGGER issue_graphql_placeholder ON sql_drop WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION extensions.set_graphql_placeholder();
CREATE EVENT TRIGGER pgrst_ddl_watch ON ddl_command_end EXECUTE FUNCTION extensions.pgrst_ddl_watch();
CREATE EVENT TRIGGER pgrst_drop_watch ON sql_drop EXECUTE FUNCTION extensions.pgrst_drop_watch();
ALTER EVENT TRIGGER issue_pg_cron_access OWNER TO supabase_admin;
ALTER EVENT TRIGGER issue_pg_net_access OWNER TO supabase_admin;
ALTER EVENT TRIGGER issue_pg_graphql_access OWNER TO supabase_admin;
ALTER EVENT TRIGGER issue_graphql_placeholder OWNER TO supabase_admin;
ALTER EVENT TRIGGER pgrst_ddl_watch OWNER TO supabase_admin;
ALTER EVENT TRIGGER pgrst_drop_watch OWNER TO supabase_admin;
"""

# The application, as a Supabase user builds it: public tables tied to auth.users, RLS with auth.uid().
_APP_SQL = """
CREATE TABLE public.profiles (
    id uuid NOT NULL PRIMARY KEY REFERENCES auth.users (id) ON DELETE CASCADE,
    username text UNIQUE CHECK (char_length(username) >= 3),
    full_name text,
    avatar_url text,
    updated_at timestamptz
);
ALTER TABLE public.profiles ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Public profiles are viewable by everyone" ON public.profiles FOR SELECT USING (true);
CREATE POLICY "Users can insert their own profile" ON public.profiles FOR INSERT WITH CHECK (auth.uid() = id);
CREATE POLICY "Users can update own profile" ON public.profiles FOR UPDATE USING ((SELECT auth.uid()) = id);

CREATE TABLE public.todos (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES auth.users (id),
    task text CHECK (char_length(task) > 3),
    is_complete boolean DEFAULT false,
    inserted_at timestamptz NOT NULL DEFAULT timezone('utc', now())
);
ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.todos FORCE ROW LEVEL SECURITY;
CREATE POLICY "Individuals manage their todos" ON public.todos FOR ALL TO authenticated
    USING (auth.uid() = user_id) WITH CHECK (auth.uid() = user_id);

-- A profile for every new user: a trigger on auth.users calling a function in public.
CREATE FUNCTION public.handle_new_user() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $fn$
BEGIN
    INSERT INTO public.profiles (id, full_name, avatar_url)
    VALUES (new.id, new.raw_user_meta_data ->> 'full_name', new.raw_user_meta_data ->> 'avatar_url');
    RETURN new;
END
$fn$;
CREATE TRIGGER on_auth_user_created AFTER INSERT ON auth.users FOR EACH ROW EXECUTE FUNCTION public.handle_new_user();

-- A view over auth data, exposed to the API.
CREATE VIEW public.user_directory WITH (security_invoker = true) AS
    SELECT p.id, p.username, u.email, u.created_at FROM public.profiles p JOIN auth.users u ON u.id = p.id;

ALTER PUBLICATION supabase_realtime ADD TABLE public.todos;
"""


def _insert_rows(conn: Any, app: bool) -> None:
    conn.execute("""
        INSERT INTO auth.schema_migrations (version)
        SELECT to_char(timestamp '2021-01-01' + g * interval '9 days', 'YYYYMMDDHH24MISS') FROM generate_series(1, 40) g;
        INSERT INTO storage.migrations (id, name, hash)
        SELECT g, 'migration-' || g, md5(g::text)::varchar(40) FROM generate_series(0, 25) g;
        INSERT INTO supabase_functions.migrations (version) VALUES ('initial'), ('20210809183423_update_grants');
        INSERT INTO realtime.schema_migrations VALUES (20211116024918, '2024-05-01 10:00:00'), (20240618124746, '2024-06-18 12:00:00');
        INSERT INTO supabase_migrations.schema_migrations VALUES
            ('20240101000000', ARRAY['create table public.profiles (...)'], 'profiles'),
            ('20240102000000', ARRAY['create table public.todos (...)', 'alter publication supabase_realtime add table todos'], 'todos');
        INSERT INTO vault.secrets (name, description, secret) VALUES ('stripe_key', 'payment provider', 'sk_test_not_a_real_key');
    """)
    with conn.cursor() as cur:
        for i, uid in enumerate(USER_IDS, 1):
            email = f"user{i}@example.test"
            cur.execute("""
                INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, email_confirmed_at,
                                        raw_app_meta_data, raw_user_meta_data, is_super_admin, created_at, updated_at)
                VALUES ('00000000-0000-0000-0000-000000000000', %s, 'authenticated', 'authenticated', %s,
                        extensions.crypt(%s, extensions.gen_salt('bf', 4)), timestamptz '2024-05-01 10:00+00' + %s * interval '1 day',
                        '{"provider": "email", "providers": ["email"]}',
                        jsonb_build_object('full_name', %s::text, 'avatar_url', %s::text), false,
                        timestamptz '2024-05-01 10:00+00' + %s * interval '1 day', now())
            """, (uid, email, f"password-{i}", i, f"User Nümber {i}", f"avatars/{uid}/me.png", i))
            cur.execute("""
                INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at)
                VALUES (%s, %s, jsonb_build_object('sub', %s::text, 'email', %s::text, 'email_verified', true), 'email', now(), now())
            """, (uid, uid, uid, email))
            cur.execute("""
                INSERT INTO auth.sessions (id, user_id, created_at, updated_at, aal, user_agent, ip)
                VALUES (extensions.uuid_generate_v4(), %s, now(), now(), 'aal1', 'Mozilla/5.0 (test)', ('203.0.113.' || %s)::inet)
                RETURNING id
            """, (uid, i))
            session = cur.fetchone()[0]
            cur.execute("""
                INSERT INTO auth.refresh_tokens (instance_id, token, user_id, revoked, created_at, updated_at, session_id)
                VALUES ('00000000-0000-0000-0000-000000000000', encode(extensions.gen_random_bytes(12), 'hex'), %s, false, now(), now(), %s)
            """, (uid, session))
            cur.execute("""
                INSERT INTO auth.audit_log_entries (instance_id, id, payload, created_at, ip_address)
                VALUES ('00000000-0000-0000-0000-000000000000', extensions.uuid_generate_v4(),
                        json_build_object('action', 'login', 'actor_id', %s::text), now(), '203.0.113.9')
            """, (uid,))
    conn.execute("""
        INSERT INTO storage.buckets (id, name, owner, public, allowed_mime_types)
        VALUES ('avatars', 'avatars', NULL, true, ARRAY['image/png', 'image/jpeg']),
               ('private-docs', 'private-docs', %s, false, NULL)
    """, (USER_IDS[0],))
    conn.execute("""
        INSERT INTO storage.objects (bucket_id, name, owner, metadata, version)
        SELECT CASE WHEN g %% 2 = 0 THEN 'avatars' ELSE 'private-docs' END,
               (ARRAY[%s, %s, %s])[1 + g %% 3] || '/folder ' || g || '/file-' || g || '.png',
               (ARRAY[%s, %s, %s])[1 + g %% 3]::uuid,
               jsonb_build_object('size', g * 1024, 'mimetype', 'image/png', 'eTag', md5(g::text)),
               extensions.uuid_generate_v4()::text
        FROM generate_series(1, 12) g
    """, (*USER_IDS, *USER_IDS))
    conn.execute("""
        INSERT INTO realtime.messages (topic, extension, payload, event, private, updated_at, inserted_at)
        SELECT 'room:' || g % 3, CASE WHEN g % 4 = 0 THEN 'presence' ELSE 'broadcast' END,
               jsonb_build_object('n', g, 'text', 'hello ' || g), 'message', g % 5 = 0,
               timestamp '2024-06-01 00:00' + g * interval '47 minutes', timestamp '2024-06-01 00:00' + g * interval '47 minutes'
        FROM generate_series(1, 50) g
    """)
    conn.execute("""
        INSERT INTO supabase_functions.hooks (hook_table_id, hook_name, created_at, request_id)
        SELECT 16400 + g % 2, 'notify_' || g % 2, timestamptz '2024-06-01 00:00+00' + g * interval '1 hour', g
        FROM generate_series(1, 8) g
    """)
    if app:
        # auth.users' trigger already made the profiles; give them usernames.
        conn.execute("UPDATE public.profiles SET username = 'user_' || right(id::text, 4), updated_at = now()")
        conn.execute("""
            INSERT INTO public.todos (user_id, task, is_complete)
            SELECT (ARRAY[%s, %s, %s])[1 + g %% 3]::uuid, 'task number ' || g, g %% 3 = 0 FROM generate_series(1, 15) g
        """, USER_IDS)
