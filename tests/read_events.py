#!/usr/bin/env python3
"""Reads a kiln run's TensorBoard event files with TensorBoard's own reader and prints JSON:
{"scalars": {tag: [[step, value], ...]}, "histograms": {tag: [step, ...]}, "text": {tag: [text, ...]}}.
Used by the Rust tests to prove the files load in TensorBoard."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
out = {
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags.get("scalars", [])},
    "histograms": {t: [e.step for e in acc.Histograms(t)] for t in tags.get("histograms", [])},
    "text": {
        t: [b"".join(e.tensor_proto.string_val).decode() for e in acc.Tensors(t)]
        for t in tags.get("tensors", [])
    },
}
print(json.dumps(out))
