-- Makes the tracker's ledger role and database when deploy/compose.yaml's
-- postgres starts on an empty volume (/docker-entrypoint-initdb.d). The
-- password is a DEVELOPMENT one, like everything in compose.yaml; the
-- tests keep using the database `test`. On a volume made before this file
-- existed, run it once:
--   docker compose -f deploy/compose.yaml exec -T postgres psql -U postgres < deploy/postgres/initdb.sql
CREATE ROLE refbus LOGIN PASSWORD 'dev-refbus';
CREATE DATABASE refbus OWNER refbus;
