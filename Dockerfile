# The deis-backup image: the agent binary (the entrypoint), the coordinator CLI `deis-backup` when it
# was built beside it, and the few shared libraries they link, on an empty base (no distribution, no
# shell, nothing to pull). The build context is a root filesystem that agent/image/build assembles
# from built binaries; build with that script, not `docker build .`:
#
#   cargo build --release -p deis-backup-agent
#   agent/image/build --binary target/release/deis-backup-agent --tag deis-backup/agent:v0.1.0
#
# It runs as root on purpose: it talks to the Docker socket and restores files with their owners.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/bin
ENTRYPOINT ["/usr/bin/deis-backup-agent"]
