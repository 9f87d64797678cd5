"""Top-1 accuracy of an ONNX model on the digits test split (eval.npz) (numpy + onnxruntime only).

Usage: python examples/digits/evaluate.py MODEL.onnx
"""

import os
import sys

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    data = np.load(os.path.join(HERE, "eval.npz"))
    x, y = data["input"], data["labels"]
    sess = ort.InferenceSession(argv[1], providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    correct = int((np.asarray(logits).argmax(axis=1) == y).sum())
    print(f"accuracy {correct / len(y):.4f} ({correct}/{len(y)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
