# The deis-backup image: the agent binary (the entrypoint), the coordinator CLI `deis-backup` when it
# was built beside it, and the few shared libraries they link, on an empty base (no distribution, no
# shell, nothing to pull). The build context is a root filesystem that agent/image/build assembles
# from built binaries; build with that script, not `docker build .`:
#
#   cargo build --release -p deis-backup-agent
#   agent/image/build --binary target/release/deis-backup-agent --tag deis-backup/agent:v0.1.0
#
# It runs as root on purpose: it talks to the Docker socket and restores files with their owners.
# It holds no secret. The fleet units mount them from the host (docs/SECURITY.md):
#   /etc/deis-backup/token                   the shared token (mode 600)
#   /etc/deis-backup/pki/ca.pem              the cluster CA
#   /etc/deis-backup/pki/agent.pem, .key     this host's certificate and key (key mode 600)
#   /etc/deis-backup/pki/coordinator.pem, .key   on the hosts that run the snapshot timer
# Both binaries refuse to start with a key or token that group or others can read.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/bin
ENTRYPOINT ["/usr/bin/deis-backup-agent"]
