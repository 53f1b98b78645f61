"""Runs `decode_attention`, or `decode_attention_codes` for a case with a codec, on saved
cases under TRITON_INTERPRET=1, in its own process.

    TRITON_INTERPRET=1 python tests/kernels/triton_interpret_runner.py CASES.pt RESULTS.pt

Triton chooses interpreter or compiler when a kernel is decorated, so the variable must be
set before anything in the process imports the kernel; a fresh process guarantees it.
test_triton_attention.py and test_triton_codes.py start this and check the results against the oracle.
"""

from __future__ import annotations

import os
import sys

import torch

from tierd_kernels.codecs import make_codec
from tierd_kernels.triton_attention import decode_attention
from tierd_kernels.triton_codes import decode_attention_codes


def main(cases_path: str, results_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (the kernels run on the CPU only under it)")
    results = []
    for case in torch.load(cases_path):
        if "codec" in case:  # an encoded pool (test_triton_codes.py)
            codec = make_codec(case["codec"], **case["params"])
            res = decode_attention_codes(case["q"], case["pool"], codec, case["block_shape"],
                                         case["table"], case["lens"], case["layer"],
                                         split_tokens=case["split_tokens"])  # fmt: skip
        else:
            res = decode_attention(case["q"], case["pool"], case["table"], case["lens"],
                                   case["layer"], split_tokens=case["split_tokens"])  # fmt: skip
        results.append({"out": res.out, "lse": res.lse})
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
