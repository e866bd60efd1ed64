#!/bin/bash
# Launcher of one scheduled clc-dask run (the CronJob's container; shipped in the
# clc-dask-launcher ConfigMap by kubectl apply -k deploy/k8s).
#
# Creates the DaskJob in $DASKJOB_MANIFEST and waits until its runner pod finishes, so the
# CronJob's concurrencyPolicy: Forbid really means one run at a time:
#   - a DaskJob of that name that already finished (Successful/Failed) is deleted first (its
#     outputs stay on the volume; `--resume` in the runner skips tiles already written);
#   - one that is still going (e.g. the launcher of an earlier schedule hit its deadline) is
#     waited for instead of started twice.
# Exit status: 0 when the run succeeded, 1 when it failed (the runner's last log lines are
# printed) or its status could no longer be read, 2 when the DaskJob could not be created.
set -euo pipefail

JOB_NAME="${DASKJOB_NAME:-clc-run}"                 # metadata.name in the manifest
MANIFEST="${DASKJOB_MANIFEST:-/launcher/daskjob.yaml}"
POLL_SECONDS="${POLL_SECONDS:-30}"

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $*"; }

job_exists() {
    [[ -n "$(kubectl get daskjob "$JOB_NAME" --ignore-not-found -o name)" ]]
}

job_status() {
    kubectl get daskjob "$JOB_NAME" -o 'jsonpath={.status.jobStatus}'
}

if job_exists; then
    status="$(job_status)"
    case "$status" in
        Successful | Failed)
            log "deleting the finished DaskJob $JOB_NAME ($status) of an earlier run"
            # foreground: return only once its runner pod and cluster are gone too, so the new
            # DaskJob's operator does not find (and reuse) their names while they terminate
            kubectl delete daskjob "$JOB_NAME" --cascade=foreground --wait=true
            ;;
        *)
            log "DaskJob $JOB_NAME is still going (status '${status:-pending}'): waiting for it instead of starting another"
            ;;
    esac
fi

if ! job_exists; then
    log "creating DaskJob $JOB_NAME from $MANIFEST"
    if ! kubectl create -f "$MANIFEST"; then
        log "could not create DaskJob $JOB_NAME: check the manifest and the launcher's RBAC"
        exit 2
    fi
fi

failures=0
while true; do
    # Tolerate a few failed reads (API server hiccups); a DaskJob deleted meanwhile ends here.
    if status="$(job_status)"; then
        failures=0
    else
        failures=$((failures + 1))
        if ((failures >= 5)); then
            log "cannot read the status of DaskJob $JOB_NAME ($failures tries in a row): giving up"
            exit 1
        fi
        status=""
    fi
    case "$status" in
        Successful)
            log "DaskJob $JOB_NAME succeeded"
            exit 0
            ;;
        Failed)
            log "DaskJob $JOB_NAME failed; last lines of its runner:"
            kubectl logs "pod/${JOB_NAME}-runner" --tail=50 || true
            exit 1
            ;;
    esac
    sleep "$POLL_SECONDS"
done
