# syntax=docker/dockerfile:1
# authgateway in a container (README: "Running in production").
#   docker build -t authgateway .
#   docker run --rm -it -v authgateway-data:/var/lib/authgateway authgateway authgateway user add /var/lib/authgateway/users.htpasswd alice
#   docker run -d --name authgateway --stop-timeout 45 -v authgateway-data:/var/lib/authgateway -p 587:2525 -p 465:4465 -p 443:8443 -p 1080:1080 authgateway
# Inside, the listeners use ports above 1024 (no privilege needed, whatever
# the runtime's net.ipv4.ip_unprivileged_port_start) on every address.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/authgateway/bin:$PATH

# The gateway's own user; it owns the data directory and nothing else.
RUN groupadd --system --gid 10001 authgateway \
    && useradd --system --uid 10001 --gid authgateway --no-create-home \
        --home-dir /var/lib/authgateway --shell /usr/sbin/nologin authgateway \
    && install -d -o authgateway -g authgateway -m 0700 /var/lib/authgateway

# The same layout as the systemd unit: a virtual environment in /opt/authgateway.
# The source is bind-mounted (BuildKit), so no layer keeps it. Twisted's
# plugin cache is written now, while the site-packages are writable.
RUN --mount=type=bind,source=.,target=/tmp/authgateway-src,rw \
    python -m venv /opt/authgateway \
    && pip install --no-cache-dir /tmp/authgateway-src \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd authgateway --help > /dev/null

USER 10001:10001
WORKDIR /var/lib/authgateway
# The spool, the certificate and the users: keep them across containers.
VOLUME ["/var/lib/authgateway"]
# smtp (STARTTLS), smtps, http, https, socks, metrics and health.
# 9108 (/metrics, /healthz, /readyz) has no authentication: never publish it
# to other hosts (at most -p 127.0.0.1:9108:9108); Prometheus reaches it on a
# private container network.
EXPOSE 2525 4465 8080 8443 1080 9108

# SIGTERM drains for up to --drain-timeout (30 s) and exits at the latest
# 10 s later: give docker stop --drain-timeout + 15 s (--stop-timeout 45,
# compose stop_grace_period: 45s); its default is 10 s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]

CMD ["twistd", "--pidfile=", "--nodaemon", "--logfile=-", "authgateway", \
     "--data-dir=/var/lib/authgateway", \
     "--auth=htpasswd:/var/lib/authgateway/users.htpasswd", \
     "--smtp=tcp:2525:interface=0.0.0.0", \
     "--smtps=tcp:4465:interface=0.0.0.0", \
     "--http=tcp:8080:interface=0.0.0.0", \
     "--https=tcp:8443:interface=0.0.0.0", \
     "--socks=tcp:1080:interface=0.0.0.0", \
     "--metrics=tcp:9108:interface=0.0.0.0"]
