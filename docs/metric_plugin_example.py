"""An example metric plug-in for `--metric`: top-1 accuracy of the first output, by hand.

Use it as `--metric docs/metric_plugin_example.py:top1_accuracy` (a file path) or, with the folder on
PYTHONPATH, `--metric metric_plugin_example:top1_accuracy` (a module).

The contract:

- Signature: `(outputs: list[list[np.ndarray]], labels: list[np.ndarray]) -> float`.
  `outputs[i]` holds sample i's graph outputs, in the graph's output order (`outputs[i][0]` is the
  first output, batch rows along axis 0). `labels[i]` holds sample i's labels, one entry per batch row,
  as the data file has them (integers for classes, strings for texts: `labels` in the .npz).
- It is called once per model and provider (original, then optimized) with the whole evaluation set;
  the report shows the value as `accuracy_*.metric` (and a line under the table), and
  `--fail-if "accuracy_drop>1%"` compares the two.
- Higher is better (an error rate: return 1 - rate, or use a built-in such as `builtin:cer`).
- Raising (or returning something `float()` refuses) stops the run with exit 2 and one line:
  `--metric MODULE:FUNCTION failed: TYPE: message`. Raise with a message that says what is wrong
  with the data, e.g. labels that do not fit the output.
- It runs only when the evaluation data has labels.
"""

from __future__ import annotations

import numpy as np


def top1_accuracy(outputs: list[list[np.ndarray]], labels: list[np.ndarray]) -> float:
    hits = total = 0
    for sample_outputs, sample_labels in zip(outputs, labels, strict=True):
        scores = sample_outputs[0]
        if scores.ndim != 2 or len(scores) != len(sample_labels):
            raise ValueError(f"expected [rows, classes] scores for {len(sample_labels)} labels, got {scores.shape}")
        hits += int(np.sum(scores.argmax(-1) == sample_labels.astype(np.int64)))
        total += len(sample_labels)
    return hits / total
