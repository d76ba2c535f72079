# syntax=docker/dockerfile:1
# Where the binary comes from (the final stage is the same either way):
#   build     (default) compiled here, in the build stage below:
#               docker build -t shunt .
#   prebuilt  a `shunt` file at the top of the build context, e.g. the one CI has built:
#               docker build --build-arg SHUNT_BINARY=prebuilt -f Dockerfile -t shunt DIR
ARG SHUNT_BINARY=build

# Build stage: a release binary from the locked dependency set.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY scripts/build-release.sh ./scripts/
# Static-pie against glibc: the proxy maps no shared library (smaller idle RSS).
RUN cp "$(scripts/build-release.sh)" /shunt

# Or the binary built elsewhere (a glibc build for Debian bookworm or older, or static).
FROM scratch AS prebuilt
COPY shunt /shunt

FROM ${SHUNT_BINARY} AS binary

# Final stage: the binary plus iptables with both backends (iptables-nft and iptables-legacy
# ship in Debian's iptables package), nft for the native nftables engine, and iproute2 (apply
# puts ::6 on lo).
FROM debian:bookworm-slim
# Debian stable's security updates change patch versions; pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=binary /shunt /usr/local/bin/shunt
# The init step needs root (with NET_ADMIN); the proxy drops to 1337 via securityContext or --user.
ENTRYPOINT ["/usr/local/bin/shunt"]
CMD ["--help"]
