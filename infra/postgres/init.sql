-- One database per gridloop service, owned by the role gridloop.
-- docker-compose.yml: run once by the postgres image on first start (POSTGRES_USER=gridloop).
-- infra/postgres/pg.sh: run on every `up`. Idempotent (psql \gexec), needs psql.
SELECT format('CREATE DATABASE %I OWNER gridloop', name)
FROM unnest(ARRAY['intake', 'dispatch', 'handling', 'verification', 'opscenter', 'auth']) AS name
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = name)
\gexec
