"""A trained ResNet-18-topology CNN on real data: scikit-learn's digits upsampled to 64x64, torch.

Random-weight CNNs have no redundancy and tiny logit margins, so they say little about how pruning
or int8 behave on trained models; this one is trained here in about two minutes on 2 CPU cores
(cached in benchmarks/.cache) and exported to ONNX with BatchNorm left unfused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_images(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.3) / 0.4
    f = size // 8
    return x.repeat(f, 1).repeat(f, 2)[:, None], d.target.astype(np.int64)


def build(width: int = 32):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.skip = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.skip(x))

    layers = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        for block in range(2):
            layers.append(Block(cin, width * mult, 2 if stage > 0 and block == 0 else 1))
            cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def train_and_export(out: Path, size: int = 64, epochs: int = 6, seed: int = 0) -> dict:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x, y = digits_images(size)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train = 1400
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (n_train // 64 + 1))
    xt, yt = torch.from_numpy(x[:n_train]), torch.from_numpy(y[:n_train])
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n_train)
        for i in range(0, n_train, 64):
            idx = perm[i : i + 64]
            batch = xt[idx]
            # Small random shifts: the digits are tiny, so the model must not memorize positions.
            dx, dy = np.random.randint(-4, 5, 2)
            batch = torch.roll(batch, shifts=(int(dx), int(dy)), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(batch), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[n_train:])).argmax(1).numpy() == y[n_train:]).mean())
        torch.onnx.export(
            model,
            torch.from_numpy(x[:1]),
            str(out),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            do_constant_folding=False,  # keep BatchNorm for the fuse pass to fold
        )
    return {"test_accuracy": acc, "x": x, "y": y, "n_train": n_train}
