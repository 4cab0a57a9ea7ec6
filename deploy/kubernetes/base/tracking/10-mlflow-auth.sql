-- Runs once on an empty data dir (postgres image's docker-entrypoint-initdb.d).
-- The tracking data goes to POSTGRES_DB (mlflow); basic-auth users and permissions to their own DB.
CREATE DATABASE mlflow_auth OWNER mlflow;
