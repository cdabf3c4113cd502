"""``python -m pybn.bench.fold_models``: batch norm folding on real architectures, side by side.

For every model of ``MODELS`` (torchvision and timm, random weights, batch norm statistics
drawn from a fixed seed), in one run:

* the batch norms computed in forward before folding, and left after ``pybn.torch.fold``
  (with ``example_inputs``), after torch's fx fuser (``torch.fx.experimental.optimization.fuse``),
  after ``pybn.onnx.fold`` of the ONNX export, after onnxruntime's optimizer
  (``ORT_ENABLE_EXTENDED``, the optimized model saved and counted) and after onnxoptimizer's
  ``fuse_bn_into_conv``;
* the largest difference of each folded model's outputs from the original's, relative to the
  largest output (torch and onnxruntime, float32), and pybn's fold times;
* with ``--time``: inference time, folded against unfolded, in torch and in onnxruntime
  (``--threads`` threads, 2 by default; onnxruntime with its default optimizations, and with
  them off to see the fold alone), the median of ``--repeats`` calls after two warm-up calls,
  the folded and the unfolded model called in turn (so that a change of the machine's load
  reaches both alike).

A batch norm counted in torch is a ``batch_norm`` call made in forward (BatchNorm modules,
timm's BatchNormAct2d, SyncBatchNorm all make one), plus a FrozenBatchNorm2d module called, or
the multiply and add left of one a tracer went through. In ONNX: a BatchNormalization node, or a
Mul by a constant of several values whose output only an Add by one reads (an exported frozen
batch norm). The ONNX export is torch's TorchScript exporter with ``training=PRESERVE``, which
keeps BatchNormalization nodes (in eval mode it folds them into the Convs itself).

Needs torch, torchvision, timm, onnx, onnxruntime (onnxoptimizer optional). Models a library
cannot build are reported as such. ``--merge-branches`` rows are added for RepVGG/MobileOne.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import io
import json
import statistics
import sys
import time
import warnings
from functools import partial
from typing import Any, Callable, NamedTuple


class Model(NamedTuple):
    name: str
    source: str  # "torchvision", "timm" or "torchvision-detection"
    build: Callable[[], Any]
    size: int = 224
    merge_branches: bool = False


def _library(name: str) -> Any:
    """A model library (torchvision, timm, onnxoptimizer: optional, without type information)."""
    return importlib.import_module(name)


def _tv(name: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        return getattr(_library("torchvision.models"), name)(weights=None, **kw)
    return build


def _timm(name: str) -> Callable[[], Any]:
    def build() -> Any:
        return _library("timm").create_model(name, pretrained=False)
    return build


def _fpn_backbone() -> Any:
    backbone_utils = _library("torchvision.models.detection.backbone_utils")
    return backbone_utils.resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5,
                                              norm_layer=_library("torchvision.ops.misc").FrozenBatchNorm2d)


def _sync_resnet18() -> Any:
    import torch

    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(_tv("resnet18")())


MODELS: list[Model] = [
    Model("resnet18", "torchvision", _tv("resnet18")),
    Model("resnet50", "torchvision", _tv("resnet50")),
    Model("resnet18 (SyncBatchNorm)", "torchvision", _sync_resnet18),
    Model("mobilenet_v3_large", "torchvision", _tv("mobilenet_v3_large")),
    Model("efficientnet_b0", "torchvision", _tv("efficientnet_b0")),
    Model("densenet121", "torchvision", _tv("densenet121")),
    Model("regnet_y_400mf", "torchvision", _tv("regnet_y_400mf")),
    Model("shufflenet_v2_x1_0", "torchvision", _tv("shufflenet_v2_x1_0")),
    Model("resnet50 FPN (FrozenBatchNorm2d)", "torchvision-detection", _fpn_backbone),
    Model("efficientnet_b0", "timm", _timm("efficientnet_b0")),
    Model("tf_efficientnet_b0", "timm", _timm("tf_efficientnet_b0")),
    Model("mobilenetv3_large_100", "timm", _timm("mobilenetv3_large_100")),
    Model("regnety_004", "timm", _timm("regnety_004")),
    Model("rexnet_100", "timm", _timm("rexnet_100")),
    Model("resnetv2_50", "timm", _timm("resnetv2_50")),
    Model("repvgg_a0", "timm", _timm("repvgg_a0")),
    Model("repvgg_a0", "timm", _timm("repvgg_a0"), merge_branches=True),
    Model("mobileone_s0", "timm", _timm("mobileone_s0")),
    Model("mobileone_s0", "timm", _timm("mobileone_s0"), merge_branches=True),
]


# --- building and counting ---------------------------------------------------------------------

def randomize(model: Any, seed: int = 0) -> Any:
    """Batch norm statistics and affine parameters drawn from `seed`: a folded model then
    differs from an unfolded one where a fold is wrong (fresh models have mean 0, var 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            mean = getattr(m, "running_mean", None)
            if isinstance(mean, torch.Tensor) and mean.dim() == 1:
                c = mean.shape[0]
                mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                for name, base in (("weight", 1.0), ("bias", 0.0)):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor) and t.shape == (c,):
                        t.copy_(base + 0.1 * torch.randn(c, generator=g))
    return model.eval()


def _frozen_class() -> Any:
    try:
        return _library("torchvision.ops.misc").FrozenBatchNorm2d
    except ImportError:  # pragma: no cover - without torchvision there is no frozen batch norm to count
        return ()


def count_torch(model: Any, x: Any) -> int:
    """Batch norms computed by one forward call of `model` (see the module's docstring)."""
    import torch
    from torch.overrides import TorchFunctionMode

    frozen = _frozen_class()
    calls = [0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func in (torch.nn.functional.batch_norm, torch.batch_norm):
                calls[0] += 1
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for m in model.modules() if frozen and isinstance(m, frozen)]
    try:
        with torch.no_grad(), Count():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls[0] + _frozen_traced_through(model, frozen)


def _frozen_traced_through(model: Any, frozen: Any) -> int:
    """Frozen batch norms a tracer went through and left in a graph (their multiply and add)."""
    import torch

    owners = set()
    for m in model.modules():
        if isinstance(m, torch.fx.GraphModule):
            for n in m.graph.nodes:
                stack = n.meta.get("nn_module_stack") or {}
                if n.op in ("call_function", "call_method") and stack:
                    name, cls = list(stack.values())[-1]
                    if (frozen and cls is frozen) or getattr(cls, "__name__", str(cls)).endswith("FrozenBatchNorm2d"):
                        owners.add((id(m), name))
    return len(owners)


def count_onnx(model: Any) -> int:
    """BatchNormalization nodes, and Mul -> Add pairs by constants of several values."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    readers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def per_channel(node: Any) -> bool:
        return any(i in consts and consts[i].size > 1 for i in node.input)
    count = 0
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            count += 1
        elif n.op_type == "Mul" and per_channel(n):
            nxt = readers.get(n.output[0], [])
            count += len(nxt) == 1 and nxt[0].op_type == "Add" and per_channel(nxt[0])
    return count


def _outputs(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    return []


def relative_error(want: list[Any], got: list[Any]) -> float:
    import numpy as np

    scale = max(float(np.abs(np.asarray(w)).max()) for w in want)
    return max(float(np.abs(np.asarray(w) - np.asarray(g)).max()) for w, g in zip(want, got)) / max(scale, 1e-30)


# --- one model ---------------------------------------------------------------------------------

def _export_onnx(model: Any, x: Any) -> Any:
    import onnx
    import torch

    buf: Any = io.BytesIO()  # (torch's annotation names paths; the TorchScript exporter takes a file object too)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buf.getvalue())


def _session(model: Any, threads: int, optimize: bool, save_to: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_to:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = save_to
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _median_ms(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median milliseconds of `a` and of `b`, timed call for call in turn after two warm-up calls
    each: on a shared machine whose load changes, both medians come from the same seconds."""
    for _ in range(2):
        a()
        b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((a, b), times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def measure(spec: Model, *, timing: bool, threads: int, repeats: int, workdir: str) -> dict[str, Any]:
    import os

    import onnx
    import torch

    import pybn.onnx
    import pybn.torch

    torch.manual_seed(0)
    row: dict[str, Any] = {"model": spec.name + (" merge" if spec.merge_branches else ""), "source": spec.source}
    model = randomize(spec.build())
    x = torch.randn(1, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [t.numpy() for t in _outputs(model(x))]
    row["bn"] = count_torch(model, x)

    t = time.perf_counter()
    folded, report = pybn.torch.fold(model, example_inputs=x, merge_branches=spec.merge_branches, return_report=True)
    row["pybn_fold_s"] = time.perf_counter() - t
    row["pybn"] = count_torch(folded, x)
    with torch.no_grad():
        row["pybn_err"] = relative_error(want, [t.numpy() for t in _outputs(folded(x))])
    row["pybn_left"] = sorted({r.reason for r in report if type(r).__name__ == "NotFolded"})

    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(model))
        row["fx"] = count_torch(fused, x)
    except Exception as exc:  # noqa: BLE001 - the peer's own failure is a result
        row["fx"] = f"fails ({type(exc).__name__})"

    onnx_model = _export_onnx(model, x)
    row["onnx_bn"] = count_onnx(onnx_model)
    t = time.perf_counter()
    onnx_folded = pybn.onnx.fold(onnx_model, merge_branches=spec.merge_branches)
    row["pybn_onnx_fold_s"] = time.perf_counter() - t
    row["pybn_onnx"] = count_onnx(onnx_folded)
    feeds = {onnx_model.graph.input[0].name: x.numpy()}
    got = _session(onnx_folded, threads, optimize=False).run(None, feeds)
    row["pybn_onnx_err"] = relative_error(want, got)
    optimized = os.path.join(workdir, "ort_optimized.onnx")
    _session(onnx_model, threads, optimize=True, save_to=optimized)
    row["ort"] = count_onnx(onnx.load(optimized))
    try:
        row["onnxoptimizer"] = count_onnx(_library("onnxoptimizer").optimize(onnx_model, ["fuse_bn_into_conv"]))
    except Exception as exc:  # noqa: BLE001 - not installed, or the peer's own failure
        row["onnxoptimizer"] = f"n/a ({type(exc).__name__})"

    if timing:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            row["torch_ms"], row["torch_folded_ms"] = _median_ms(lambda: model(x), lambda: folded(x), repeats)
        for optimize, key in ((True, "ort"), (False, "ort_noopt")):
            a, b = _session(onnx_model, threads, optimize), _session(onnx_folded, threads, optimize)
            row[f"{key}_ms"], row[f"{key}_folded_ms"] = _median_ms(partial(a.run, None, feeds),
                                                                   partial(b.run, None, feeds), repeats)
    return row


# --- the table ---------------------------------------------------------------------------------

def render(rows: list[dict[str, Any]], timing: bool) -> str:
    lines = ["| model | source | BN | pybn | fx fuser | ONNX BN | pybn.onnx | ORT | onnxoptimizer | "
             "err torch | err ORT | fold s (torch/onnx) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['source']} | {r['error']} |" + " |" * 9)
            continue
        lines.append(f"| {r['model']} | {r['source']} | {r['bn']} | {r['pybn']} | {r['fx']} | {r['onnx_bn']} | "
                     f"{r['pybn_onnx']} | {r['ort']} | {r['onnxoptimizer']} | {r['pybn_err']:.1e} | "
                     f"{r['pybn_onnx_err']:.1e} | {r['pybn_fold_s']:.2f} / {r['pybn_onnx_fold_s']:.2f} |")
    if timing:
        lines += ["", "| model | torch ms | torch folded ms | ORT ms | ORT folded ms | ORT no-opt ms | "
                      "ORT no-opt folded ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "torch_ms" in r:
                lines.append(f"| {r['model']} | {r['torch_ms']:.1f} | {r['torch_folded_ms']:.1f} | {r['ort_ms']:.1f} | "
                             f"{r['ort_folded_ms']:.1f} | {r['ort_noopt_ms']:.1f} | {r['ort_noopt_folded_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    summary = (__doc__ or "").split("\n\n")[0]  # (python -OO strips docstrings)
    p = argparse.ArgumentParser(prog="python -m pybn.bench.fold_models", description=summary)
    p.add_argument("--models", nargs="*", help="only the models whose name contains one of these")
    p.add_argument("--time", action="store_true", help="also measure inference time, folded and unfolded")
    p.add_argument("--threads", type=int, default=2, help="threads for torch and onnxruntime (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be >= 1")
    chosen = [m for m in MODELS if not args.models or any(s in m.name for s in args.models)]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec in chosen:
            print(f"{spec.name}{' (merge_branches)' if spec.merge_branches else ''}...", file=sys.stderr, flush=True)
            try:
                rows.append(measure(spec, timing=args.time, threads=args.threads, repeats=args.repeats,
                                    workdir=workdir))
            except Exception as exc:  # noqa: BLE001 - one model failing does not stop the table
                rows.append({"model": spec.name, "source": spec.source, "error": f"{type(exc).__name__}: {exc}"[:120]})
    print(render(rows, args.time))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
