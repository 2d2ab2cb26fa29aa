# The deis-backup-agent image: the agent binary and the few shared libraries it links, on an empty
# base (no distribution, no shell, nothing to pull). The build context is a root filesystem that
# agent/image/build assembles from a built binary; build with that script, not `docker build .`:
#
#   cargo build --release -p deis-backup-agent
#   agent/image/build --binary target/release/deis-backup-agent --tag deis-backup/agent:v0.1.0
#
# It runs as root on purpose: it talks to the Docker socket and restores files with their owners.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/bin
ENTRYPOINT ["/usr/bin/deis-backup-agent"]
