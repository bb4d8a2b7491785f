#!/usr/bin/env bash
# The main job, end to end: fetch the default model, start lmsd, load it with a TTL, show it.
# Then serves it over HTTP and asks it a question with the openai SDK.
# Uses your real lms home (platformdirs) unless LMS_HOME is set; LMS_DEMO_PORT picks the HTTP port (1234).
set -euo pipefail
LMS=${LMS:-lms}
PORT=${LMS_DEMO_PORT:-1234}
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
step server start --port "$PORT"
"$LMS" server start --port "$PORT"
printf '\n\033[1m$ python: openai.OpenAI(base_url="http://127.0.0.1:%s/v1").chat.completions.create(...)\033[0m\n' "$PORT"
"$(dirname "$LMS")/python" - "$PORT" <<'PY'
import sys
import openai

client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="not-needed")
reply = client.chat.completions.create(
    model="smollm2-135m-instruct",
    messages=[{"role": "system", "content": "Answer in one word."},
              {"role": "user", "content": "What is the capital of France?"}],
    temperature=0, max_tokens=30, extra_body={"ttl": 3600},
)
print(reply.choices[0].message.content)
print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
PY
step ps
"$LMS" ps
printf '\nlmsd keeps running with the model loaded (it unloads itself after 1h idle).\n'
printf 'Use the CLI as %s, or: source %s/activate\n' "$LMS" "$(dirname "$LMS")"
printf 'HTTP endpoint: http://127.0.0.1:%s/v1 (OpenAI) and /api/v0 (LM Studio)\n' "$PORT"
printf 'Stop everything with: %s daemon down\n' "$LMS"
