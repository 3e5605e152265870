-- The three databases of the production stack (deploy/docker-compose.yaml; `make prod-up` creates the same ones).
CREATE DATABASE tuneline_dagster;
CREATE DATABASE tuneline_mlflow;
CREATE DATABASE tuneline_optuna;
