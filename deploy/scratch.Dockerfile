# The offline path to the same images as deploy/Dockerfile: nothing is pulled. The build
# context is a directory holding the statically linked binaries and an empty `data`
# directory, which `cargo xtask images` prepares (target/static/images) before running
#
#   docker build -f <context>/Dockerfile --target <service> -t runnel-<service>:<tag> <context>
#
# for each service. There is no shell in these images: health checks run the binary's own
# `healthcheck` subcommand.

FROM scratch AS runtime
# The volume mount point, owned by the unprivileged user the services run as; Docker seeds
# a new named volume with it, ownership included.
COPY --chown=65532:65532 data /data
USER 65532:65532
WORKDIR /data

FROM runtime AS collector
COPY runnel-collector /usr/local/bin/
EXPOSE 7101 9101
HEALTHCHECK --interval=2s --timeout=3s --start-period=60s --retries=5 \
    CMD ["/usr/local/bin/runnel-collector", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/runnel-collector"]

FROM runtime AS broker
COPY runnel-broker /usr/local/bin/
EXPOSE 7102 9102
HEALTHCHECK --interval=2s --timeout=3s --start-period=60s --retries=5 \
    CMD ["/usr/local/bin/runnel-broker", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/runnel-broker"]

FROM runtime AS analyzer
COPY runnel-analyzer /usr/local/bin/
EXPOSE 7103 9103
HEALTHCHECK --interval=2s --timeout=3s --start-period=60s --retries=5 \
    CMD ["/usr/local/bin/runnel-analyzer", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/runnel-analyzer"]

FROM runtime AS store
COPY runnel-store /usr/local/bin/
EXPOSE 7104 9104
HEALTHCHECK --interval=2s --timeout=3s --start-period=60s --retries=5 \
    CMD ["/usr/local/bin/runnel-store", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/runnel-store"]

FROM runtime AS gateway
COPY runnel-gateway /usr/local/bin/
EXPOSE 7105 9105 8080
HEALTHCHECK --interval=2s --timeout=3s --start-period=60s --retries=5 \
    CMD ["/usr/local/bin/runnel-gateway", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/runnel-gateway"]

# Test support: an OTLP/gRPC receiver that prints every span it receives as a JSON line
# (tests/bin/otlp_sink.rs), the trace endpoint of the compose end-to-end test.
FROM runtime AS otlp-sink
COPY runnel-otlp-sink /usr/local/bin/
EXPOSE 4317
ENTRYPOINT ["/usr/local/bin/runnel-otlp-sink"]
