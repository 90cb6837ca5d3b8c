# tempesta-ts in a container. Run it with --network=host so that the instances' real source
# addresses are seen (through Docker's NAT every instance would share one address):
#   docker run -d --network=host -v /etc/tempesta-ts:/etc/tempesta-ts:ro \
#     -v tempesta-ts-spool:/var/spool/tempesta-ts tempesta-ts
# The volume holds the spool and the archive of every line (spool_dir/archive, from which the
# buffers are rebuilt when the container starts again): keep it across container upgrades.
FROM python:3.12-slim

RUN useradd --system --home-dir /var/lib/tempesta-ts --shell /usr/sbin/nologin tempesta-ts \
    && mkdir -p /etc/tempesta-ts /var/spool/tempesta-ts \
    && chown tempesta-ts: /var/spool/tempesta-ts

COPY . /tmp/tempesta-ts
# Regenerate twistd's plugin cache as root: the non-root user cannot write it at run time.
RUN pip install --no-cache-dir /tmp/tempesta-ts \
    && rm -rf /tmp/tempesta-ts \
    && python -c "from twisted.plugin import IPlugin, getPlugins; from twisted import plugins; list(getPlugins(IPlugin, plugins))"

USER tempesta-ts
# The spool and the archive (/var/spool/tempesta-ts/archive): durable across containers.
VOLUME ["/var/spool/tempesta-ts"]
EXPOSE 5555/udp 5555/tcp
# /healthz answers 200 while UDP and TCP listen (metrics_host:metrics_port; with metrics_port
# 0 there is nothing to probe: then override it with --no-healthcheck). No curl in slim.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9478/healthz', timeout=2)" || exit 1
# --pidfile= : a pid file left in the image by a killed container would stop the next start.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "tempesta-ts"]
CMD ["--config", "/etc/tempesta-ts/tap.conf"]
