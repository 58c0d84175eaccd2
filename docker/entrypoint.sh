#!/bin/sh
# Entrypoint of the opticam-worker image.
#
# No arguments: start the GPU workers of $OPTICAM_POOL, one Prefect process worker per
# visible GPU (`opticam worker` stops them all on SIGTERM, which `docker stop` sends).
# Arguments: run them instead. A Prefect docker or kubernetes worker that uses this image
# for one flow run passes the run's command (`prefect flow-run execute`), and compose
# services pass their own commands.
set -eu
if [ "$#" -eq 0 ]; then
    exec opticam worker --pool "${OPTICAM_POOL:-gpu}"
fi
exec "$@"
