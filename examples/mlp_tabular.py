"""Dropout and batch norm in a wide MLP on tabular data, trained from NumPy with pybn.

This is the "Red Wine" model of the Keras tutorial on dropout and batch normalization,
rebuilt on pybn: three times ``Dense(width) -> ReLU -> Dropout(0.3) -> BatchNorm`` (the
tutorial's Keras order), then ``Dense(1)``, mean absolute error, Adam, batch 256. The
dense layers are NumPy matmuls with a hand-written backward (``numpy_layers.py``, shared
by the examples); the batch norm and dropout layers are ``pybn.nn.BatchNorm`` and
``pybn.nn.Dropout`` (``p`` is the probability of DROPPING a unit, as in PyTorch and
Keras' ``rate``).

It trains four configurations, each with batch norm:

* inputs raw or standardized (scikit-learn's ``StandardScaler``): the tutorial's point is
  that batch norm lets the raw, badly scaled inputs train;
* with or without the dropout layers;

and, as the reference that point needs, the tutorial's model without its batch norm
layers on the raw inputs. It prints the final train and validation losses of each in one
table and writes the learning curves to a PNG. Both losses are measured in eval mode
after each epoch (Keras' history shows the training-mode average instead, which dropout
inflates). Batch norm uses PyTorch's defaults (momentum 0.1, eps 1e-5; Keras' are 0.01
in PyTorch's terms and 1e-3), and width 512 instead of the tutorial's 1024 keeps the run
to about 20 s.

Dataset: scikit-learn's bundled diabetes data (442 patients, 10 features, no download),
loaded with ``scaled=False``, so the features keep their raw units (age in years, sex
coded 1/2, BMI, blood pressure, six blood serum measurements from about 3 to 300). Like
the red-wine quality of the tutorial, the target (disease progression after one year) is
a regression target, and the features come on very different scales: the situation the
tutorial uses to show batch norm at work. (``load_wine`` is a 178-row classification
set, too small to show much.) The target is standardized with the training split's
mean and standard deviation in every configuration; losses are reported back in the
target's units.

Run it (about 20 s on 2 cores)::

    pip install .[examples]
    python examples/mlp_tabular.py            # writes mlp_tabular.png
    python examples/mlp_tabular.py --out curves.png --epochs 100

Everything is seeded (data split, weight initialization, batch order, dropout streams),
so the printed table is the same on every run.
"""
from __future__ import annotations

import argparse

import numpy as np

import pybn.nn as nn
from numpy_layers import Adam, Linear, ReLU, Sequential, limit_threads

DTYPE = np.float32
P_DROP = 0.3  # the tutorial's Dropout(0.3): drop 30% of the units


# --------------------------------------------------------------------------- data

def load_data(seed):
    """(x_train, y_train, x_valid, y_valid, y_scale): raw float32 features, standardized targets."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True, scaled=False)  # raw units, not sklearn's pre-scaled copy
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.25, random_state=seed)
    # the target is always standardized, so the configurations differ only in their inputs
    mu, sd = y_tr.mean(), y_tr.std()
    return (x_tr.astype(DTYPE), ((y_tr - mu) / sd).astype(DTYPE)[:, None],
            x_va.astype(DTYPE), ((y_va - mu) / sd).astype(DTYPE)[:, None], float(sd))


def standardize(x_train, x_valid):
    """StandardScaler fitted on the training split only (no peeking at validation)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train).astype(DTYPE), scaler.transform(x_valid).astype(DTYPE)


# --------------------------------------------------------------------------- model

def build_model(n_in, width, dropout, batchnorm, seed):
    """The tutorial's model: 3 x (Dense -> ReLU -> [Dropout] -> [BatchNorm]), then Dense(1)."""
    rng = np.random.default_rng(seed)
    layers, n = [], n_in
    for i in range(3):
        layers += [Linear(n, width, rng), ReLU()]
        if dropout:
            # a distinct, fixed stream per layer: the run is reproducible, the masks independent
            layers.append(nn.Dropout(P_DROP, seed=seed * 100 + i))
        if batchnorm:
            layers.append(nn.BatchNorm(width))
        n = width
    layers.append(Linear(n, 1, rng))
    return Sequential(layers)


# --------------------------------------------------------------------------- training

def mae(pred, target):
    """Mean absolute error and its gradient with respect to pred."""
    diff = pred - target
    return float(np.abs(diff).mean()), (np.sign(diff) / diff.size).astype(DTYPE)


def evaluate(model, x, y):
    model.eval()  # running statistics, no dropout
    loss, _ = mae(model(x), y)
    model.train()
    return loss


def fit(model, data, epochs, batch_size, seed):
    """Train; return per-epoch train and validation MAE (eval mode, standardized units)."""
    x_tr, y_tr, x_va, y_va = data
    opt = Adam(model.parameters(), lr=1e-3, eps=1e-7)  # Keras' defaults
    order_rng = np.random.default_rng(seed)
    history = {"train": [], "valid": []}
    for _ in range(epochs):
        order = order_rng.permutation(len(x_tr))
        for start in range(0, len(x_tr), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # batch norm needs 2 rows per batch for its statistics
                continue
            _, dloss = mae(model(x_tr[idx]), y_tr[idx])
            model.backward(dloss)
            opt.step()
        # both losses in eval mode, so dropout does not inflate the training curve
        history["train"].append(evaluate(model, x_tr, y_tr))
        history["valid"].append(evaluate(model, x_va, y_va))
    return history


# --------------------------------------------------------------------------- report

def print_table(results, y_scale):
    """One row per configuration; MAE in the target's units."""
    print(f"{'inputs':<13}{'batch norm':>11}{'dropout':>8}{'train MAE':>11}{'valid MAE':>11}"
          f"{'best valid (epoch)':>20}")
    for (inputs, dropout, batchnorm), hist in results.items():
        valid = np.asarray(hist["valid"]) * y_scale
        best = int(np.argmin(valid))
        print(f"{inputs:<13}{('yes' if batchnorm else 'no'):>11}{(str(P_DROP) if dropout else '-'):>8}"
              f"{hist['train'][-1] * y_scale:>11.2f}{valid[-1]:>11.2f}{valid[best]:>13.2f} ({best + 1:>3})")


def plot(results, y_scale, baseline, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), sharey=True)
    # the first epochs of the raw-input models start far off: zoom on the rest
    top = 2.0 * max(np.median(hist["valid"]) for hist in results.values()) * y_scale
    for ax, ((inputs, dropout, batchnorm), hist) in zip(axes, results.items()):
        epochs = np.arange(1, len(hist["train"]) + 1)
        ax.plot(epochs, np.asarray(hist["train"]) * y_scale, label="train")
        ax.plot(epochs, np.asarray(hist["valid"]) * y_scale, label="validation")
        ax.axhline(baseline, color="gray", ls=":", lw=1, label="predict the mean")
        ax.set_ylim(0, top)
        ax.set_title(f"{inputs} inputs\n" + (f"dropout {P_DROP}" if dropout else "no dropout")
                     + ("" if batchnorm else ", NO batch norm"), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MAE (disease progression units)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Diabetes MLP with pybn batch norm and dropout: learning curves", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="mlp_tabular.png", help="PNG file for the learning curves")
    ap.add_argument("--epochs", type=int, help="default 100 (5 with --quick)")
    ap.add_argument("--width", type=int, help="units of each hidden Dense layer; default 512 (64 with --quick)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for NumPy's BLAS and for pybn (see limit_threads)")
    ap.add_argument("--quick", action="store_true", help="5 epochs of a narrow model (a smoke test)")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 5 if args.quick else 100
    if args.width is None:
        args.width = 64 if args.quick else 512
    return args


def main(argv=None):
    args = parse_args(argv)
    blas_limit = limit_threads(args.threads)  # noqa: F841 (keep the limit alive)
    x_tr, y_tr, x_va, y_va, y_scale = load_data(args.seed)
    inputs = {"raw": (x_tr, x_va), "standardized": standardize(x_tr, x_va)}
    # (inputs, dropout, batch norm); the last is the reference without batch norm
    configs = [("raw", True, True), ("raw", False, True), ("standardized", True, True),
               ("standardized", False, True), ("raw", True, False)]
    results = {}
    for name, dropout, batchnorm in configs:
        xt, xv = inputs[name]
        # the same seed everywhere: the Dense layers of every configuration start from the same weights
        model = build_model(x_tr.shape[1], args.width, dropout, batchnorm, args.seed)
        results[(name, dropout, batchnorm)] = fit(model, (xt, y_tr, xv, y_va), args.epochs, args.batch_size,
                                                  args.seed)
    print(f"diabetes: {len(x_tr)} train / {len(x_va)} validation rows; MLP 3 x {args.width}, "
          f"{args.epochs} epochs, Adam, batch {args.batch_size}; MAE after the last epoch:")
    print_table(results, y_scale)
    baseline = float(np.abs(y_va).mean()) * y_scale  # y is centred on the training mean
    print(f"(predicting the training mean: valid MAE {baseline:.2f})")
    plot(results, y_scale, baseline, args.out)
    print(f"learning curves: {args.out}")


if __name__ == "__main__":
    main()
