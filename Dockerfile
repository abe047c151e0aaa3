# nextgate in a FROM-scratch image around a static binary; needs no base image from a registry.
#
#   make image        # builds target/x86_64-unknown-linux-gnu/release/nextgate statically, then this
#   docker run --rm -p 8080:8080 -p 127.0.0.1:8081:8081 -p 8082:8082 \
#       -e NEXTGATE_ADMIN_KEY=change-me-0123456789 -v nextgate-state:/var/lib/nextgate nextgate
FROM scratch
COPY target/x86_64-unknown-linux-gnu/release/nextgate /nextgate
COPY conf/container.toml /etc/nextgate/nextgate.toml
EXPOSE 8080 8081 8082
ENTRYPOINT ["/nextgate", "-c", "/etc/nextgate/nextgate.toml"]
