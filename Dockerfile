# Sagaflow's image: the `sagaflow` command (operator, runner, run, prune) and the samples
# in /app/samples. No ENTRYPOINT: the chart's `command: ["sagaflow", ...]` picks the
# subcommand. It runs as uid/gid 10001 with a read-only root filesystem (the chart's
# securityContext): bytecode is compiled at build time and HOME is /tmp, the only
# writable place besides the mounted payload directory.
#
#   docker build -t sagaflow:dev .
#
# On linux/arm64 the image has no embedded Postgres (pgserver publishes no wheel for
# it); a cluster never uses one: the chart always sets SAGAFLOW_DATABASE_URL.

FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY step_runners/ step_runners/
# A virtualenv, so the final stage copies one folder; a regular (non-editable) install
# without the test extras.
RUN python -m venv /opt/sagaflow && /opt/sagaflow/bin/pip install /src

FROM python:3.12-slim
LABEL org.opencontainers.image.title="sagaflow" \
      org.opencontainers.image.description="Sagaflow operator and step runners: workflows run as sagas, state in Postgres"
# USER: kopf names the operator by getpass.getuser(), which without it looks the uid
# up in /etc/passwd and fails for a uid the cluster picks (runAsUser other than 10001).
ENV PATH=/opt/sagaflow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    USER=sagaflow
RUN groupadd --system --gid 10001 sagaflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin sagaflow
COPY --from=build /opt/sagaflow /opt/sagaflow
COPY samples/ /app/samples/
# The sample runner modules are imported from this read-only folder: compile them now.
# The check fails the build if the package or the sample runners do not import.
RUN python -m compileall -q /app/samples \
 && sagaflow --help >/dev/null \
 && python -c "from sagaflow_runner import default_registry, load_module; load_module('/app/samples/order_runners.py'); assert len(default_registry)"
WORKDIR /app
USER 10001:10001
CMD ["sagaflow", "--help"]
