"""A worker process for tests/integration/test_models.py: maps a model from tierd, builds it
with transformers on the mapped weights, and reports.

    python models_worker.py ADDRESS MODEL OUT_FILE

Writes the logits of fixed token ids to OUT_FILE (torch.save), reads every weight once
(so all of the area's pages are resident in this process), prints one JSON line
{"pid", "address", "size"} and waits until stdin closes, so the test can read this
process's /proc/PID/smaps while its siblings hold the same mapping.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from tierd_client import TierdClient
from tierd_client.hf_weights import model_on_weights

IDS = [[1, 17, 42, 99, 3, 250, 7, 8]]


def main() -> None:
    address, model, out = sys.argv[1:4]
    with TierdClient(address, timeout=60) as client:
        weights = client.load_weights(model)
    net = model_on_weights(weights)
    with torch.no_grad():
        logits = net(torch.tensor(IDS)).logits
        for t in weights.values():  # touch every page of the mapping
            t.float().sum()
    torch.save(logits, out)
    print(json.dumps({"pid": os.getpid(), "address": weights.address, "size": weights.size}),
          flush=True)  # fmt: skip
    sys.stdin.read()  # until the test closes our stdin


if __name__ == "__main__":
    main()
