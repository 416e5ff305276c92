#!/bin/bash
# Stand-in entrypoint (see Dockerfile): as the real one, a root start of `label-studio...` hands
# the data folder to the label-studio user and runs the command as that user.
set -e
if [[ "$(id -u)" == "0" ]]; then
    if [[ "$1" == label-studio* ]]; then
        find /label-studio/data \! -user label-studio -exec chown label-studio '{}' +
    fi
    exec setpriv --reuid=999 --regid=999 --init-groups "$@"
fi
exec "$@"
