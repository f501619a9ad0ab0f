#!/usr/bin/env bash
# make run: the agent on the default model with the sample SmolLM2 adapters
# (tests/fixtures/lora/smollm2), and the curl lines to try it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
MODEL=${MODEL:-models/smollm2-135m-instruct-q4_1.gguf}
PORT=${PORT:-8000}
ADMIN_PORT=${ADMIN_PORT:-8001}
SAMPLES=$PWD/tests/fixtures/lora/smollm2
cat <<TXT
Starting loraplane-agent on http://127.0.0.1:$PORT (admin: $ADMIN_PORT) with the
sample adapters $(cd "$SAMPLES" && for d in */; do printf '%s ' "${d%/}"; done)from $SAMPLES.
Try, from another terminal:

  curl -s localhost:$PORT/v1/models
  curl -s localhost:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct-q4_1", "messages": [{"role": "user", "content": "What is Kubernetes?"}], "max_tokens": 64}'
  curl -sN localhost:$PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "r4-qv", "prompt": "The capital of France is", "max_tokens": 32, "stream": true}'
  curl -s localhost:$ADMIN_PORT/v1/loras
  curl -s localhost:$ADMIN_PORT/metrics | head

Stop with Ctrl-C.
TXT
exec "$BIN/loraplane-agent" --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
	--admin-port "$ADMIN_PORT" --lora-dir "$SAMPLES" --allowed-local-roots "$PWD"
