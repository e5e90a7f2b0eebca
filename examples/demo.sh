#!/usr/bin/env bash
# The demo: bring the embedded stack up, generate examples/prompts.jsonl with the `small` model,
# print the summary, bring the stack down (also when something fails).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=.df/demo
trap '$BIN/disagfusion down --data-dir $DATA' EXIT
$BIN/disagfusion up --data-dir $DATA
$BIN/disagfusion submit examples/prompts.jsonl --out out/demo --data-dir $DATA
