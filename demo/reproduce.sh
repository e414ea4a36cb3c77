#!/usr/bin/env bash
# Rebuild the demo assets (demo/model, demo/text-model, demo/codec, demo/semantic,
# demo/demo.json) from nothing, on a CPU: speak the corpus, fit the codec and the semantic
# tokenizer, tokenize, train SoundStorm and the text-to-semantic model, export. Run from the repository root with the package installed (make setup):
#
#   bash demo/reproduce.sh [WORK]        (WORK defaults to demo-build/)
#
# Every step is seeded; a re-run is resumable (tokenize and train continue where they
# stopped).
set -euo pipefail
WORK=${1:-demo-build}
BIN=${SOUNDSTORM:-.venv/bin/soundstorm}
PY=${PYTHON:-.venv/bin/python}

[ -f "$WORK/speech/speech-corpus.json" ] || \
    "$BIN" speech-corpus "$WORK/speech" --minutes 40 --heldout-utterances 24 --seed 0
[ -f "$WORK/codec/config.json" ] || \
    "$BIN" fit-codec "$WORK/speech/train.jsonl" --out "$WORK/codec" \
        --num-quantizers 4 --codebook-size 256 --seed 0
[ -f "$WORK/semantic/semantic.json" ] || \
    "$BIN" fit-semantic "$WORK/speech/train.jsonl" --out "$WORK/semantic" \
        --kind mfcc --vocab-size 256 --rate 25 --seed 0
for split in train heldout; do
    [ -f "$WORK/tokens/$split/corpus.json" ] || \
        "$BIN" tokenize "$WORK/speech/$split.jsonl" --codec melrvq --codec-path "$WORK/codec" \
            --semantic "$WORK/semantic" --out "$WORK/tokens/$split"
done
# Validation on the held-out voices: how well the model carries a voice it never heard.
"$BIN" train --preset tiny --config demo/train.yaml --data "$WORK/tokens/train" \
    --val-data "$WORK/tokens/heldout" --out "$WORK/run"
"$PY" -m soundstorm.demo.export "$WORK"
