#!/bin/sh
# Creates the bucket and one MinIO user per role with its policy (idempotent; users live on the
# PVC), then stays up so the pod is Ready only once the users exist. Roles and their Secrets:
#   models  (policy, ppm)        rstar-s3-models   read models/, write models/policy|ppm/ (base version)
#   search                       rstar-s3-search   trajectories/ only
#   trainer (evolution, Jobs)    rstar-s3-trainer  the whole bucket: the only writer of new models
# The sandbox gets no credentials at all.
set -eu
rm -f /tmp/users-ready
export MC_HOST_local="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@127.0.0.1:9000"
until mc ready local >/dev/null 2>&1; do sleep 2; done
mc mb --ignore-existing local/rstar
provision() {  # provision ROLE ACCESS_KEY SECRET_KEY
    mc admin policy create local "rstar-$1" "/etc/rstar-minio/$1.json"
    mc admin user add local "$2" "$3"
    mc admin policy attach local "rstar-$1" --user "$2" 2>/dev/null || echo "rstar-$1 already attached to $2"
}
provision models "$MODELS_ACCESS_KEY" "$MODELS_SECRET_KEY"
provision search "$SEARCH_ACCESS_KEY" "$SEARCH_SECRET_KEY"
provision trainer "$TRAINER_ACCESS_KEY" "$TRAINER_SECRET_KEY"
touch /tmp/users-ready
echo "minio users ready"
exec sleep infinity
