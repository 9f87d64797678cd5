"""Train and export the edgec example model (scikit-learn ``load_digits``).

Re-run (from the repo root, /work/main):

    python -m venv /tmp/trainenv && /tmp/trainenv/bin/pip install torch==2.13.0 scikit-learn numpy onnx onnxruntime
    /tmp/trainenv/bin/python examples/digits/train.py

torch / scikit-learn are NOT edgec dependencies; only this script uses them.

Writes, next to this file:
  model.onnx     opset 17, legacy TorchScript exporter, dynamic batch dim,
                 BatchNormalization nodes kept un-fused (for the BN-folding pass)
  eval.npz       held-out test split: input [360,1,8,8] float32 and labels [360] int64
                 (edgec compile --eval examples/digits/eval.npz)
  calib.npz      calibration split: input [200,1,8,8] float32, disjoint from the test split
                 (edgec compile --calib examples/digits/calib.npz)
                 Both already normalised: x = (pixel/16 - mean) / std
  metadata.json  normalisation constants, split sizes, onnxruntime test accuracy

Splits (seed 0, stratified): 360 test, 200 calib, remaining 1237 train.
"""

import collections
import json
import os
import random

import numpy as np
import onnx
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
HERE = os.path.dirname(os.path.abspath(__file__))
EPOCHS = 60
BATCH = 64


def set_determinism(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def conv_bn_relu(cin, cout, k, stride=1, groups=1, relu=True):
    layers = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = conv_bn_relu(c, c, 3)
        self.b = conv_bn_relu(c, c, 3, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.b(self.a(x)) + x)


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(1, 16, 3)                  # 16x8x8
        self.res = ResBlock(16)                             # 16x8x8
        self.branch1 = conv_bn_relu(16, 8, 1)               # 8x8x8
        self.branch3 = conv_bn_relu(16, 8, 3)               # 8x8x8
        self.dw = conv_bn_relu(16, 16, 3, stride=2, groups=16)  # 16x4x4
        self.pw = conv_bn_relu(16, 32, 1)                   # 32x4x4
        self.pool = nn.AdaptiveAvgPool2d(1)                 # 32x1x1
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.res(self.stem(x))
        x = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
        x = self.pw(self.dw(x))
        return self.fc(self.flatten(self.pool(x)))


def main():
    set_determinism(SEED)

    digits = load_digits()
    x_all = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # N,1,8,8 in [0,1]
    y_all = digits.target.astype(np.int64)

    x_rest, x_test, y_rest, y_test = train_test_split(
        x_all, y_all, test_size=360, stratify=y_all, random_state=SEED)
    x_train, x_calib, y_train, _ = train_test_split(
        x_rest, y_rest, test_size=200, stratify=y_rest, random_state=SEED)

    mean = float(x_train.mean())
    std = float(x_train.std())
    norm = lambda a: ((a - np.float32(mean)) / np.float32(std)).astype(np.float32)
    x_train, x_calib, x_test = norm(x_train), norm(x_calib), norm(x_test)

    model = DigitsNet()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)

    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d} loss {total / len(xt):.4f}")

    model.eval()
    with torch.no_grad():
        torch_acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"torch test accuracy {torch_acc:.4f}")

    # Export. Model is in eval mode; TrainingMode.PRESERVE skips the legacy
    # exporter's eval-mode peephole that would fuse Conv+BatchNormalization,
    # so BN nodes stay in the graph (exported with inference semantics).
    model_path = os.path.join(HERE, "model.onnx")
    torch.onnx.export(
        model, torch.from_numpy(x_test[:1]), model_path,
        opset_version=17, dynamo=False,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    m = onnx.load(model_path)
    onnx.checker.check_model(m, full_check=True)
    hist = collections.Counter(n.op_type for n in m.graph.node)
    print("ops:", dict(sorted(hist.items())))
    assert hist["BatchNormalization"] == hist["Conv"] == 7, hist  # BN not fused
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs.get("training_mode", 0) == 0, n

    import onnxruntime as ort
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x_test})[0]
    ort_acc = float((logits.argmax(1) == y_test).mean())
    print(f"onnxruntime test accuracy {ort_acc:.4f}")

    # Keyed the way edgec reads them: the model's input name (+ "labels" for evaluation).
    np.savez_compressed(os.path.join(HERE, "eval.npz"), input=x_test, labels=y_test)
    np.savez_compressed(os.path.join(HERE, "calib.npz"), input=x_calib)
    meta = {
        "dataset": "scikit-learn load_digits",
        "input": "input",
        "output": "logits",
        "input_shape": ["batch", 1, 8, 8],
        "normalisation": "x = (pixel / 16 - mean) / std",
        "mean": mean,
        "std": std,
        "test_accuracy_onnxruntime": ort_acc,
        "test_accuracy_torch": float(torch_acc),
        "train_samples": int(len(x_train)),
        "calib_samples": int(len(x_calib)),
        "test_samples": int(len(x_test)),
        "seed": SEED,
        "epochs": EPOCHS,
        "opset": 17,
        "torch_version": torch.__version__,
        "params": int(params),
        "op_histogram": dict(sorted(hist.items())),
    }
    with open(os.path.join(HERE, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
