#!/usr/bin/env python3
"""Create the MLflow role and database on an existing PostgreSQL server, once.

    MLFLOW_DB_PASSWORD=... PGHOST=db-host PGUSER=postgres PGPASSWORD=... \\
        python jobs/mlflow-server/init_db.py [--db mlflow] [--role mlflow]

The administrator connection comes from libpq's usual environment (PGHOST, PGPORT, PGUSER,
PGPASSWORD, PGSSLMODE, ~/.pgpass), so no password appears on a command line that other
users of a login node can read with ``ps``. It is safe to run again: an existing role gets
its password reset to MLFLOW_DB_PASSWORD, an existing database is left as it is. MLflow
creates its own tables when ``serve.sh`` first starts against the database.

Prints the ``MLFLOW_BACKEND_STORE_URI`` for ``serve.sh``, with the password masked.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="mlflow", help="database to create (default: mlflow)")
    p.add_argument("--role", default="mlflow", help="login role that owns it (default: mlflow)")
    p.add_argument("--admin-db", default="postgres",
                   help="database the administrator connects to (default: postgres)")
    return p


def init_db(db: str, role: str, password: str, admin_db: str = "postgres") -> str:
    """Create (or update) ``role`` and create ``db`` owned by it; return the masked URI."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(dbname=admin_db)
    conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
                        (password,))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(db), sql.Identifier(role)))
        host = conn.info.host if conn.info.host and not conn.info.host.startswith("/") else "localhost"
        port = conn.info.port
    finally:
        conn.close()
    return f"postgresql://{role}:***@{host}:{port}/{db}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    password = os.environ.get("MLFLOW_DB_PASSWORD", "")
    if not password:
        print("init_db: set MLFLOW_DB_PASSWORD to the password the MLflow role should have",
              file=sys.stderr)
        return 2
    try:
        import psycopg2
    except ImportError:
        print("init_db: pip install psycopg2-binary (or 'calotune[team]')", file=sys.stderr)
        return 2
    try:
        uri = init_db(args.db, args.role, password, args.admin_db)
    except psycopg2.Error as exc:
        print(f"init_db: {str(exc).strip()}", file=sys.stderr)
        return 1
    print(f"ready; start the server with MLFLOW_BACKEND_STORE_URI={uri} (*** = MLFLOW_DB_PASSWORD)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
