# A bundle as its own image, for deploy/kubernetes: an init container copies /bundle into an emptyDir that the
# server mounts read-only. Build it with the bundle directory as the context:
#   docker build -f deploy/bundle.Dockerfile -t registry.example.com/steerprune-bundle:digits runs/quickstart/bundle
# The base only needs `cp` (the init container's command); the server image also works: BASE_IMAGE=steerprune:cpu.
ARG BASE_IMAGE=busybox:1.37
FROM ${BASE_IMAGE}
COPY --chown=10001:10001 . /bundle
USER 10001:10001
