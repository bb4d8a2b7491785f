#!/usr/bin/env bash
# The main job, end to end: fetch the default model, start lmsd, load it with a TTL, show it.
# Uses your real lms home (platformdirs) unless LMS_HOME is set.
set -euo pipefail
LMS=${LMS:-lms}
step() { printf '\n\033[1m$ lms %s\033[0m\n' "$*"; }

step get smollm2-135m-instruct
"$LMS" get smollm2-135m-instruct
step daemon up
"$LMS" daemon up
step ls
"$LMS" ls
step load smollm2-135m-instruct --ttl 1h
"$LMS" load smollm2-135m-instruct --ttl 1h -y
step ps
"$LMS" ps
step server settings
"$LMS" server settings
printf '\nlmsd keeps running with the model loaded (it unloads itself after 1h idle).\n'
printf 'Use the CLI as %s, or: source %s/activate\n' "$LMS" "$(dirname "$LMS")"
printf 'Stop everything with: %s daemon down\n' "$LMS"
