"""A Luxima-like sample database (profiles, projects, files, audit log) for the demo, tests and benchmarks.

Data is realistic rather than filler: uuids, e-mail addresses, timestamps, jsonb documents and
text drawn from a vocabulary, so it compresses like a real application database (3-6x).
"""

from __future__ import annotations

from typing import Any

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE IF NOT EXISTS public.profiles (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL UNIQUE,
    full_name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    settings jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS public.projects (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id uuid NOT NULL REFERENCES public.profiles(id),
    name text NOT NULL,
    description text,
    created_at timestamptz NOT NULL DEFAULT now(),
    metadata jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS public.files (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id bigint NOT NULL REFERENCES public.projects(id),
    path text NOT NULL,
    size_bytes bigint NOT NULL,
    mime_type text NOT NULL,
    md5 text NOT NULL,
    uploaded_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS public.audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor_id uuid,
    action text NOT NULL,
    payload jsonb NOT NULL,
    message text NOT NULL,
    at timestamptz NOT NULL
);
"""

_VOCABULARY = (
    "alpha beta gamma delta invoice report upload storage bucket project member owner admin update "
    "delete create login logout session token refresh policy backup restore nginx config deploy build "
    "release jakarta bandung surabaya medan data table query index cache queue worker email profile"
).split()
_WORDS = "'{" + ",".join(_VOCABULARY) + "}'::text[]"


def _phrase(n: int) -> str:
    # n words drawn from the vocabulary: compressible, yet not constant.
    parts = [f"({_WORDS})[1 + floor(random() * {len(_VOCABULARY)})::int]" for _ in range(n)]
    return " || ' ' || ".join(parts)


def populate(conn: Any, scale: float = 1.0, batch: int = 50_000) -> dict[str, int]:
    """Create the schema and fill it; ``scale`` 1 is ~10 MB, 100 is ~1 GB of dump. Returns row counts."""
    profiles = max(10, int(1_000 * scale))
    projects = max(10, int(2_000 * scale))
    files = max(10, int(8_000 * scale))
    audit = max(10, int(25_000 * scale))
    conn.execute(SCHEMA)
    conn.execute(
        f"""INSERT INTO public.profiles (email, full_name, created_at, settings)
        SELECT 'user' || g || '@' || (ARRAY['luxima.id','example.com','mail.co.id'])[1 + g % 3],
               initcap({_phrase(2)}), now() - (g || ' minutes')::interval,
               jsonb_build_object('theme', (ARRAY['dark','light'])[1 + g % 2], 'locale', 'id-ID', 'notify', g % 5 = 0)
        FROM generate_series(1, {profiles}) g"""
    )
    conn.execute(
        f"""INSERT INTO public.projects (owner_id, name, description, created_at, metadata)
        SELECT ids.a[1 + g % {profiles}], initcap({_phrase(2)}), {_phrase(12)}, now() - (g || ' hours')::interval,
               jsonb_build_object('tier', (ARRAY['free','pro','team'])[1 + g % 3], 'region', 'ap-southeast-3', 'seats', g % 40)
        FROM generate_series(1, {projects}) g, (SELECT array_agg(id) AS a FROM public.profiles) ids"""
    )
    for start in range(0, files, batch):
        n = min(batch, files - start)
        conn.execute(
            f"""INSERT INTO public.files (project_id, path, size_bytes, mime_type, md5, uploaded_at)
            SELECT 1 + (g % {projects}), 'projects/' || (1 + g % {projects}) || '/' || {_phrase(2)} || '-' || g || '.pdf',
                   (random() * 10000000)::bigint, (ARRAY['application/pdf','image/png','text/csv'])[1 + g % 3],
                   md5(g::text), now() - (g || ' seconds')::interval
            FROM generate_series({start + 1}, {start + n}) g"""
        )
    for start in range(0, audit, batch):
        n = min(batch, audit - start)
        conn.execute(
            f"""INSERT INTO public.audit_log (actor_id, action, payload, message, at)
            SELECT gen_random_uuid(), (ARRAY['login','upload','delete','update','share'])[1 + g % 5],
                   jsonb_build_object('ip', '10.' || (g % 255) || '.' || (g % 7) || '.' || (g % 13),
                                      'agent', 'Mozilla/5.0 (X11; Linux x86_64) Chrome/' || (100 + g % 30),
                                      'request_id', md5(g::text), 'ok', g % 17 <> 0),
                   {_phrase(16)}, now() - (g || ' seconds')::interval
            FROM generate_series({start + 1}, {start + n}) g"""
        )
    conn.execute("ANALYZE")
    return {"public.profiles": profiles, "public.projects": projects, "public.files": files, "public.audit_log": audit}


def populate_files(root: Any, scale: float = 1.0, seed: int = 7) -> dict[str, int]:
    """A sample of user files as object storage keeps them: avatars, documents and photos in nested
    folders, text that compresses and image-like bytes that do not (~2 MB and 200 files per scale)."""
    import os
    import random
    from pathlib import Path

    rng = random.Random(seed)
    root = Path(root)
    count = max(10, int(200 * scale))
    total = 0
    for i in range(count):
        kind = rng.choice(("avatars", "documents", "documents", "photos"))
        if kind == "avatars":
            path = root / "avatars" / f"user-{i % 50:03d}" / f"avatar-{i}.png"
            data = rng.randbytes(rng.randint(2_000, 20_000))
        elif kind == "documents":
            path = root / "documents" / f"project-{i % 12:02d}" / f"notes {i}.md"
            data = (" ".join(rng.choice(_VOCABULARY) for _ in range(rng.randint(200, 8000))) + "\n").encode()
        else:
            path = root / "photos" / f"2026/{1 + i % 12:02d}" / f"IMG_{i:05d}.jpg"
            data = b"\xff\xd8\xff\xe0" + rng.randbytes(rng.randint(5_000, 40_000))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
    os.symlink("avatars", root / "current-avatars")
    return {"files": count, "bytes": total}


def populate_configs(root: Any) -> dict[str, int]:
    """A sample application server's configs under ``root``: Nginx (a site enabled by a link), Coolify's
    ``.env`` with generated secrets, the Compose files of two services, and a TLS private key."""
    import os
    import secrets
    from pathlib import Path

    root = Path(root)
    files = {
        "etc/nginx/nginx.conf": "user www-data;\nworker_processes auto;\nevents { worker_connections 1024; }\n"
                                "http {\n  include /etc/nginx/conf.d/*.conf;\n  include /etc/nginx/sites-enabled/*;\n}\n",
        "etc/nginx/sites-available/luxima.conf": "server {\n  listen 443 ssl;\n  server_name luxima.example;\n"
                                                 "  ssl_certificate_key /etc/ssl/private/luxima.key;\n"
                                                 "  location /api/ { proxy_pass http://127.0.0.1:8000; }\n}\n",
        "data/coolify/source/.env": f"APP_ID=luxima\nAPP_KEY=base64:{secrets.token_urlsafe(32)}\n"
                                    f"DB_USERNAME=coolify\nDB_PASSWORD={secrets.token_urlsafe(18)}\n"
                                    f"REDIS_PASSWORD={secrets.token_urlsafe(18)}\nPUSHER_APP_SECRET={secrets.token_hex(16)}\n",
        "data/coolify/services/api/docker-compose.yml": "services:\n  api:\n    image: luxima/api:1.4\n    environment:\n"
                                                        f"      - DATABASE_URL=postgres://api:{secrets.token_urlsafe(12)}@db:5432/luxima\n"
                                                        "      - LOG_LEVEL=info\n",
        "data/coolify/services/web/docker-compose.yml": "services:\n  web:\n    image: luxima/web:2.0\n    ports: ['3000:3000']\n",
        "etc/ssl/private/luxima.key": "-----BEGIN PRIVATE KEY-----\n" + secrets.token_urlsafe(48) + "\n-----END PRIVATE KEY-----\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel in ("data/coolify/source/.env", "etc/ssl/private/luxima.key"):
        os.chmod(root / rel, 0o600)
    (root / "etc/nginx/sites-enabled").mkdir(parents=True, exist_ok=True)
    os.symlink("../sites-available/luxima.conf", root / "etc/nginx/sites-enabled/luxima.conf")
    return {"files": len(files), "symlinks": 1}


def populate_images(docker: Any) -> str:
    """An application image (built from a small root filesystem: no registry needed) and two containers running it,
    of compose project ``luxima``; the image's ID."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("app/server.py", b"print('luxima app')\n"), ("etc/luxima-release", b"luxima app 1.0\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    image_id = docker.docker("import", "-", "luxima/app:1.0", input=buf.getvalue()).decode().strip()
    for n in (1, 2):
        docker.docker("create", "--name", f"luxima-app-{n}", "-l", "com.docker.compose.project=luxima",
                      "-l", "com.docker.compose.service=app", "luxima/app:1.0", "/app/server.py")
    return image_id
