# PostgreSQL, PgBouncer, Redis and Prometheus from Debian 12's packages, on the offline base
# (scripts/container-engine base): what the compose test runs in place of the official
# images, which cannot be pulled here. One image, one entrypoint per server (entrypoints/).
ARG BASE_IMAGE=aiwfe-base:bookworm
FROM ${BASE_IMAGE}
RUN mkdir -p /etc/postgresql-common/createcluster.d \
    && echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/aiwfe.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15 \
       pgbouncer redis-server prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql /prometheus /etc/pgbouncer \
    && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql /etc/pgbouncer \
    && chmod 700 /var/lib/postgresql/data \
    && chown prometheus:prometheus /prometheus
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
COPY entrypoints/ /usr/local/bin/
