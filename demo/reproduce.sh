#!/usr/bin/env bash
# Rebuild the demo assets (demo/model, demo/text-model, demo/codec with its vocoder,
# demo/semantic, demo/demo.json) from nothing, on a CPU: speak a many-voice corpus, fit the
# codec, its vocoder and the semantic tokenizer, tokenize, train SoundStorm (then give it a
# prompt lookup, fine-tune and calibrate its copy gates) and the text-to-semantic model,
# export. Run from the repository root with the package installed
# (make setup):
#
#   bash demo/reproduce.sh [WORK]        (WORK defaults to demo-build/)
#
# Every step is seeded; a re-run is resumable (finished stages are skipped, tokenize and
# the trainings continue where they stopped). The time of each stage is printed and
# appended to WORK/stage-times.tsv (export sums a resumed stage's runs into demo.json).
set -euo pipefail
WORK=${1:-demo-build}
BIN=${SOUNDSTORM:-.venv/bin/soundstorm}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$WORK"

stage() {  # stage NAME DONE-FILE COMMAND...: run COMMAND unless DONE-FILE exists, timed
    local name=$1 done=$2 start=$SECONDS
    shift 2
    if [ -n "$done" ] && [ -e "$done" ]; then
        echo "== $name: done already ($done)"
        return
    fi
    echo "== $name"
    "$@"
    printf '%s\t%d\n' "$name" $((SECONDS - start)) | tee -a "$WORK/stage-times.tsv"
}

# 200 voices (every English accent x voice variant, each at its own pitch, speed and
# formant warp); 8 of them, built from voice variants no training voice uses, held out.
stage speech-corpus "$WORK/speech/speech-corpus.json" \
    "$BIN" speech-corpus "$WORK/speech" --voices 200 --heldout-voices 8 --minutes 90 \
        --heldout-utterances 8 --seed 0
stage fit-codec "$WORK/codec/config.json" \
    "$BIN" fit-codec "$WORK/speech/train.jsonl" --out "$WORK/codec" \
        --num-quantizers 4 --codebook-size 256 --seed 0
stage fit-vocoder "$WORK/codec/vocoder.safetensors" \
    "$BIN" fit-vocoder "$WORK/codec" "$WORK/speech/train.jsonl" --steps 3000 --seed 0
stage fit-semantic "$WORK/semantic/semantic.json" \
    "$BIN" fit-semantic "$WORK/speech/train.jsonl" --out "$WORK/semantic" \
        --kind mfcc --vocab-size 256 --rate 25 --seed 0
for split in train heldout; do
    stage "tokenize-$split" "$WORK/tokens/$split/corpus.json" \
        "$BIN" tokenize "$WORK/speech/$split.jsonl" --codec melrvq --codec-path "$WORK/codec" \
            --semantic "$WORK/semantic" --out "$WORK/tokens/$split"
done
# Validation on the held-out voices: how well the model carries a voice it never heard.
stage train-soundstorm "" \
    "$BIN" train --preset tiny --config demo/train.yaml --data "$WORK/tokens/train" \
        --val-data "$WORK/tokens/heldout" --out "$WORK/run"
# The trained model given a prompt lookup (demo/lookup.yaml) and fine-tuned with it.
stage train-lookup "" \
    "$BIN" train --preset tiny --init-from "$WORK/run/model" --config demo/lookup.yaml \
        --data "$WORK/tokens/train" --val-data "$WORK/tokens/heldout" --out "$WORK/run-lookup"
# The lookup's copy gates fitted to voices it never heard, from a second small corpus with
# other voices and sentences (seed 3: none of its voices uses a variant of the demo's
# held-out voices), after giving level 1 a copy of its own: the prompt's level-1 codes
# where it read the same semantic ids; then every level's prompt prior (how often the
# prompt uses each code) fitted on top. Export takes the calibrated model.
stage calibration-corpus "$WORK/calibration-speech/speech-corpus.json" \
    "$BIN" speech-corpus "$WORK/calibration-speech" --voices 24 --heldout-voices 16 \
        --minutes 4 --heldout-utterances 6 --seed 3
stage tokenize-calibration "$WORK/tokens/calibration/corpus.json" \
    "$BIN" tokenize "$WORK/calibration-speech/heldout.jsonl" --codec melrvq \
        --codec-path "$WORK/codec" --semantic "$WORK/semantic" --out "$WORK/tokens/calibration"
stage calibrate-copy "$WORK/calibrated/copy-calibration.json" \
    "$BIN" calibrate-copy "$WORK/run-lookup/model" --data "$WORK/tokens/calibration" \
        --out "$WORK/calibrated" --add-semantic-copy --add-prompt-prior
# shellcheck disable=SC2046  # the settings file holds one flag per word
stage train-text "" \
    "$BIN" train-text --data "$WORK/tokens/train" --val-data "$WORK/tokens/heldout" \
        --out "$WORK/text-run" $(grep -v '^#' demo/text-train.args)
stage export "" "$PY" -m soundstorm.demo.export "$WORK"
