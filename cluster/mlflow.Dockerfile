# The image of the MLflow tracking server (cluster/kuberay/mlflow.yaml): MLflow with its
# basic-auth app, the PostgreSQL driver and boto3 for S3 artifacts, installed at build time
# (the pod never pip-installs), running as an unprivileged user. It needs no build context:
#   docker build -t REPLACE_REGISTRY/zosam-mlflow:3.17.2 - < cluster/mlflow.Dockerfile
#   docker push REPLACE_REGISTRY/zosam-mlflow:3.17.2
# mlflow is the client's version (pyproject.toml; tests/test_cluster_configs.py checks it).
# To pin the base image by digest (cluster/README.md, "Image digests"), replace the tag below
# with python:3.11-slim@sha256:<digest of the image you reviewed>.
FROM python:3.11-slim

RUN pip install --no-cache-dir 'mlflow[auth]==3.17.2' Flask-WTF==1.3.0 'psycopg[binary]==3.3.9' boto3==1.44.5 \
 && groupadd --gid 10001 mlflow \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow mlflow

# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
