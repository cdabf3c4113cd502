"""MC-dropout: predictive mean and variance from dropout kept on at inference, with pybn.

A small regression MLP (``Dense(64) -> ReLU -> BatchNorm -> Dropout(0.2)``, twice, then
``Dense(1)``) is trained on scikit-learn's bundled diabetes data (442 patients, 10
standardized features; no download) with pybn's NumPy layers. At inference,
``pybn.nn.mc_dropout(layers, seed=S, sample=t)`` keeps the dropout layers on, with the
masks of sample t fixed by the seed (batch norm stays in evaluation mode), so T forward
passes give T predictions per patient: their mean is the MC-dropout prediction and their
variance its (epistemic) uncertainty. The masks are a pure function of (seed, sample,
layer, position in the batch): running the script again, on any machine, prints the same
table, and the script checks that a second pass over the samples gives the same bits.

Run it (a few seconds)::

    pip install .[examples]
    python examples/mc_dropout.py
    python examples/mc_dropout.py --samples 200 --seed 7
"""
from __future__ import annotations

import argparse

import numpy as np

import pybn.nn as nn
from numpy_layers import Adam, Linear, ReLU, Sequential, limit_threads

DTYPE = np.float64
P_DROP = 0.2


def load_data(seed):
    """Standardized features and targets, split 75/25."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_diabetes(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.25, random_state=seed)
    scaler = StandardScaler().fit(x_tr)
    mu, sd = y_tr.mean(), y_tr.std()
    return (scaler.transform(x_tr).astype(DTYPE), ((y_tr - mu) / sd).astype(DTYPE)[:, None],
            scaler.transform(x_va).astype(DTYPE), ((y_va - mu) / sd).astype(DTYPE)[:, None], float(sd))


def build_model(n_in, width, seed):
    rng = np.random.default_rng(seed)
    layers, n = [], n_in
    for i in range(2):
        layers += [Linear(n, width, rng, dtype=DTYPE), ReLU(), nn.BatchNorm(width, dtype=DTYPE),
                   nn.Dropout(P_DROP, seed=seed * 100 + i)]
        n = width
    layers.append(Linear(n, 1, rng, dtype=DTYPE))
    return Sequential(layers)


def fit(model, x, y, epochs, batch_size, seed):
    opt = Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - 1, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # batch norm needs 2 values per channel
                continue
            pred = model(x[idx])
            model.backward(2.0 * (pred - y[idx]) / len(idx))  # mean squared error
            opt.step()
    return model.eval()


def mc_predict(model, x, samples, seed):
    """(mean, variance) over `samples` MC-dropout passes, and the stacked predictions."""
    preds = []
    for t in range(samples):
        with nn.mc_dropout(model.layers, seed=seed, sample=t):
            preds.append(model(x)[:, 0])
    stacked = np.stack(preds)
    return stacked.mean(axis=0), stacked.var(axis=0, ddof=1), stacked


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, help="default 60 (10 with --quick)")
    ap.add_argument("--samples", type=int, default=50, help="MC-dropout passes (default 50)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="10 epochs, 20 samples (a smoke test)")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 10 if args.quick else 60
    if args.quick:
        args.samples = min(args.samples, 20)
    return args


def main(argv=None):
    args = parse_args(argv)
    blas_limit = limit_threads(args.threads)  # noqa: F841 (keep the limit alive)
    x_tr, y_tr, x_va, y_va, y_scale = load_data(args.seed)
    model = fit(build_model(x_tr.shape[1], args.width, args.seed), x_tr, y_tr, args.epochs, args.batch_size,
                args.seed)
    plain = model(x_va)[:, 0]  # evaluation mode: dropout off
    mean, var, stacked = mc_predict(model, x_va, args.samples, seed=args.seed + 1)
    _, _, again = mc_predict(model, x_va, args.samples, seed=args.seed + 1)
    if not np.array_equal(stacked, again):
        raise SystemExit("MC-dropout passes differ between two runs over the same samples")
    err = np.abs(mean - y_va[:, 0])
    std = np.sqrt(var)
    order = np.argsort(std)
    half = len(order) // 2
    print(f"MC-dropout on diabetes (validation, {len(x_va)} patients, {args.samples} samples, p={P_DROP})")
    print(f"{'RMSE, dropout off':<34}{y_scale * np.sqrt(np.mean((plain - y_va[:, 0]) ** 2)):10.2f}")
    print(f"{'RMSE, MC mean':<34}{y_scale * np.sqrt(np.mean(err ** 2)):10.2f}")
    print(f"{'mean predictive std':<34}{y_scale * std.mean():10.2f}")
    print(f"{'MAE, half with the lowest std':<34}{y_scale * err[order[:half]].mean():10.2f}")
    print(f"{'MAE, half with the highest std':<34}{y_scale * err[order[half:]].mean():10.2f}")
    print(f"{'repeat of the passes':<34}{'identical':>10}")
    print(f"{'first patient: mean +- std':<34}{y_scale * mean[0]:10.2f} +- {y_scale * std[0]:.2f}")


if __name__ == "__main__":
    main()
