#!/usr/bin/env bash
# Train the two CIFAR-10 float models on a GPU (used once on a lent H200; see docs/RESULTS.md).
# Usage: GPFQ_DATA_DIR=... bash scripts/train_cifar_gpu.sh OUTDIR [EPOCHS]
# Writes OUTDIR/<name>.tar.gz holding the workdir (float checkpoint, metrics, summary, log).
set -u
out=${1:?output folder}; epochs=${2:-30}
mkdir -p "$out"
for name in cifar10_cnn cifar10_resnet20; do
  wd=/tmp/gpu_train/$name; mkdir -p /tmp/gpu_train
  timeout 250 python3 train.py --config=configs/$name.py --workdir=$wd \
    --config.seed=0 --config.num_epochs="$epochs" --config.batch_size=128 \
    --config.learning_rate=0.1 > "$wd.log" 2>&1
  echo "$name rc=$?"; tail -c 400 "$wd.log" | tr '\r' '\n' | tail -3
  mv "$wd.log" "$wd/train.log" 2>/dev/null
  tar -czf "$out/$name.tar.gz" -C /tmp/gpu_train --exclude=checkpoints "$name"
done
