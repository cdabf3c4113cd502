"""The tensors and files of ONNX models, for :func:`pybn.onnx.fold` and ``python -m pybn fold``.

* ``check``: what fold asks of a model before it reads it: the ONNX checker's verdict
  (taken on a copy without the weights, so it works for models past protobuf's 2 GiB), and
  every tensor holding exactly the data its shape and type need.
* ``ExternalData``: tensors stored as external data, read only from regular files inside
  the model's folder.
* ``save``: writing a model so that a failure at any point leaves no partial file: the data
  go to temporary files in the destination's folder, renamed into place once complete.
  Tensors stored as external data stay external, in one data file next to the model.

Private to ``pybn.onnx`` and its command line, which import it after their guarded ``import onnx``.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

TensorProto = onnx.TensorProto
EXTERNAL = TensorProto.EXTERNAL
SMALL = 1024  # bytes: smaller tensors keep their data in the model file and in light copies
PROTOBUF_LIMIT = 2**31 - 1  # bytes: the most one serialized protobuf message may hold
_COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_COPY_CHUNK)

# data_type -> (the typed field holding its values, values per element); 4-, 2- and 6-bit
# types pack several elements per value and are only checked in raw_data
_FIELDS: dict[int, tuple[str, int]] = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1)}
_INT32_FIELD_TYPES = ("INT32", "INT16", "INT8", "UINT16", "UINT8", "BOOL", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN",
                      "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0")
_FIELDS.update({getattr(TensorProto, name): ("int32_data", 1) for name in _INT32_FIELD_TYPES
                if hasattr(TensorProto, name)})
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}


# --- every tensor of a model -------------------------------------------------------------------

def tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every tensor of `model` with where it is: initializers, sparse initializers and tensor
    attributes (Constant values...), in the main graph, every subgraph and every function."""
    yield from _graph_tensors(model.graph, "")
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node, f" in function {function.name}")


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[Any, str]]:
    for t in graph.initializer:
        yield t, f"initializer {t.name!r}{where}"
    for s in graph.sparse_initializer:
        yield s.values, f"sparse initializer {s.values.name!r}{where}"
        yield s.indices, f"indices of sparse initializer {s.values.name!r}{where}"
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node: onnx.NodeProto, where: str) -> Iterator[tuple[Any, str]]:
    label = node.name or f"{node.op_type}:{node.output[0] if node.output else ''}"
    for a in node.attribute:
        here = f"attribute {a.name!r} of node {label}{where}"
        if a.HasField("t"):
            yield a.t, here
        yield from ((t, here) for t in a.tensors)
        for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
            yield s.values, here
            yield s.indices, here
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            yield from _graph_tensors(g, f" in a subgraph of node {label}{where}")


# --- what a tensor must hold -------------------------------------------------------------------

def data_bytes(data_type: int, count: int) -> int | None:
    """The bytes of raw data `count` elements of `data_type` take (None: not fixed, or unknown)."""
    try:
        name = TensorProto.DataType.Name(data_type)
        bits = _PACKED_BITS.get(name) or np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8
    except (ValueError, KeyError, TypeError):
        return None
    if name in ("UNDEFINED", "STRING"):
        return None
    return (count * bits + 7) // 8


def _shape(t: onnx.TensorProto) -> str:
    try:
        type_name = TensorProto.DataType.Name(t.data_type)
    except ValueError:
        type_name = str(t.data_type)
    return f"its shape {tuple(t.dims)} and type {type_name}"


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def data_problem(t: onnx.TensorProto) -> str | None:
    """Why `t` does not hold exactly the data its dims and type call for (None: it does).

    External data is checked as far as the tensor tells (a declared length); the file itself
    when it is read (``ExternalData``).
    """
    if any(d < 0 for d in t.dims):
        return f"has a negative dimension in {tuple(t.dims)}"
    count = math.prod(t.dims)
    present = [f for f in _DATA_FIELDS if (t.HasField(f) if f == "raw_data" else len(getattr(t, f)))]
    if t.data_location == EXTERNAL:
        if present:
            return f"has external data and {present[0]} too"
        return _external_problem(t, count)
    if len(present) > 1:
        return f"has data in two fields ({present[0]}, {present[1]})"
    if not present:
        return None if count == 0 else f"holds no data; {_shape(t)} need {count} elements"
    if present[0] == "raw_data":
        need = data_bytes(t.data_type, count)
        got = len(t.raw_data)
        if need is not None and got != need:
            return f"holds {got} bytes of raw data; {_shape(t)} need {need}"
        return None
    field, per_element = _FIELDS.get(t.data_type, (None, 1))
    got = len(getattr(t, present[0]))
    if field is not None and (present[0] != field or got != count * per_element):
        return f"holds {got} values in {present[0]}; {_shape(t)} need {count * per_element} in {field}"
    return None


def _external_problem(t: onnx.TensorProto, count: int) -> str | None:
    info = _external_info(t)
    if not info.get("location"):
        return "has external data without a location"
    for key in ("offset", "length"):
        if key in info and not (info[key].isdigit()):
            return f"has external data with {key} {info[key]!r} (not a whole number >= 0)"
    need = data_bytes(t.data_type, count)
    if "length" in info and need is not None and int(info["length"]) != need:
        return f"has {info['length']} bytes of external data; {_shape(t)} need {need}"
    return None


# --- checking a model ----------------------------------------------------------------------------

def check(model: onnx.ModelProto, external: ExternalData | None = None) -> None:
    """Raise ValueError("model: ...") unless `model` passes the ONNX checker and every tensor
    holds the data its shape needs (with `external`, external data files are checked too)."""
    for t, where in tensors(model):
        problem = data_problem(t)
        if problem is None and external is not None and t.data_location == EXTERNAL:
            problem = external.problem(t)
        if problem:
            raise ValueError(f"model: {where} {problem}")
    try:
        onnx.checker.check_model(light_copy(model, big_initializers="empty"))
    except onnx.checker.ValidationError as e:
        raise ValueError(f"model: {one_line(e)}") from None


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (onnx.checker's name the node on a line of their own)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def light_copy(model: onnx.ModelProto, *, big_initializers: str) -> onnx.ModelProto:
    """A copy of `model` without its large tensors' data, for the checker and shape inference.

    Main-graph initializers with more than SMALL bytes, or with external data, are never copied:
    ``big_initializers="empty"`` puts an empty tensor (dims [0]) of the same name and type in
    their place (the checker looks at names and types, not at weights), ``"inputs"`` makes them
    graph inputs of their type and shape instead (what shape inference needs). Other large or
    external tensors (Constant values, subgraphs) are copied, then emptied (``"empty"``) or kept.
    """
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    inputs = {v.name for v in model.graph.input}
    for t in model.graph.initializer:
        if not _is_big(t):
            out.graph.initializer.add().CopyFrom(t)
        elif big_initializers == "empty":
            _empty(out.graph.initializer.add(), t)
        elif t.name not in inputs:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if big_initializers == "empty":
        for t, _ in tensors(out):
            if _is_big(t):
                _empty(t, t)
    return out


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _is_big(t: onnx.TensorProto) -> bool:
    return t.data_location == EXTERNAL or t.ByteSize() > SMALL


def _empty(target: onnx.TensorProto, source: onnx.TensorProto) -> None:
    name, data_type = source.name, source.data_type
    target.Clear()
    target.name, target.data_type = name, data_type
    target.dims.append(0)


# --- external data -------------------------------------------------------------------------------

class ExternalData:
    """Tensors stored as external data, read from regular files inside `base_dir` only.

    A location that is absolute, climbs out of the folder (``..``), or leads out of it through
    a symbolic link, a file that is missing or not a regular file, and a range past the end
    of the file are refused (ValueError naming the tensor), never followed.
    """

    def __init__(self, base_dir: str) -> None:
        self.base_dir = os.path.realpath(base_dir or ".")

    def problem(self, t: onnx.TensorProto) -> str | None:
        try:
            self.locate(t)
        except ValueError as e:
            return str(e)
        return None

    def locate(self, t: onnx.TensorProto) -> tuple[str, int, int]:
        """(the data file's real path, offset, length) of external tensor `t`, checked."""
        info = _external_info(t)
        location = info.get("location", "")
        parts = location.replace("\\", "/").split("/")
        if not location or os.path.isabs(location) or location.startswith("\\"):
            raise ValueError(f"has external data at {location!r}, which is not a path relative to the model's "
                             "folder")
        if ".." in parts:
            raise ValueError(f"has external data at {location!r}, outside the model's folder")
        path = os.path.join(self.base_dir, *parts)
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.base_dir]) != self.base_dir:
            raise ValueError(f"has external data at {location!r}, which leads outside the model's folder")
        if os.path.islink(path):
            raise ValueError(f"has external data at {location!r}, a symbolic link")
        try:
            st = os.stat(real)
        except OSError as e:
            raise ValueError(f"has external data at {location!r}, which cannot be read ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"has external data at {location!r}, which is not a regular file")
        offset = int(info.get("offset", "0"))
        need = data_bytes(t.data_type, math.prod(t.dims))
        length = int(info["length"]) if "length" in info else (need if need is not None else st.st_size - offset)
        if offset + length > st.st_size:
            raise ValueError(f"has external data at {location!r} bytes {offset} to {offset + length}, past the end "
                             f"of the file ({st.st_size} bytes)")
        if need is not None and length != need:
            raise ValueError(f"has {length} bytes of external data; {_shape(t)} need {need}")
        return real, offset, length

    def read(self, t: onnx.TensorProto) -> bytes:
        path, offset, length = self.locate(t)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ValueError(f"has external data that ended after {len(data)} of {length} bytes")
        return data

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        inline = TensorProto()
        inline.name, inline.data_type = t.name, t.data_type
        inline.dims.extend(t.dims)
        inline.raw_data = self.read(t)
        return numpy_helper.to_array(inline)

    def copy_to(self, t: onnx.TensorProto, out: BinaryIO) -> int:
        """Append `t`'s data to `out` (zero runs as holes); return the number of bytes."""
        path, offset, length = self.locate(t)
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise ValueError(f"has external data that ended after {length - left} of {length} bytes")
                _write_sparse(out, chunk)
                left -= len(chunk)
        return length


def _write_sparse(out: BinaryIO, data: bytes) -> None:
    """Write `data`, skipping over every all-zero MiB (the file gets holes there; save
    truncates the file to its full length, so that trailing holes count too)."""
    view = memoryview(data)
    for start in range(0, len(view), _COPY_CHUNK):
        chunk = view[start:start + _COPY_CHUNK]
        if chunk == _ZERO_CHUNK[:len(chunk)]:
            out.seek(len(chunk), os.SEEK_CUR)
        else:
            out.write(chunk)


# --- writing -------------------------------------------------------------------------------------

def save(model: onnx.ModelProto, path: str, external: ExternalData | None = None,
         keep: tuple[str, ...] = ()) -> str | None:
    """Write `model` to `path` so that any failure leaves `path` as it was and no partial file.

    Tensors stored as external data (relative to `external`'s folder), and with them every
    main-graph initializer larger than SMALL bytes, are written to one data file next to the
    model; so is everything when the model would not fit in one protobuf message. `model` is
    changed: those tensors now point to the new data file. A symbolic link at `path` is
    followed (the link stays, its target is replaced), unless a data file is written and the
    target is in another folder than the link: ONNX looks for the data file in the folder of the
    path it loads, so the link would not load; that is refused (ValueError) before anything is
    written. Anything else that is not a regular file
    (a directory, a device, a FIFO) is refused, as is a file `model`'s external data is read
    from. The data file never replaces such a file or one of `keep` (the input model). Returns
    the data file's name, if any.
    """
    target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    if os.path.basename(path) in ("", ".", ".."):  # (abspath would make "out.onnx/" or "out.onnx/." "out.onnx")
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
    if os.path.lexists(target) and not stat.S_ISREG(os.stat(target).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", path)  # renaming onto /dev/null would replace it
    sources = _external_sources(model, external)
    if target in sources:
        raise ValueError(f"it holds the external data of {sources[target]}")
    folder, name = os.path.split(target)
    uses_external = any(t.data_location == EXTERNAL for t, _ in tensors(model))
    if not uses_external and model.ByteSize() <= PROTOBUF_LIMIT:
        _write_new(target, lambda f: f.write(model.SerializeToString()))
        return None
    if os.path.realpath(folder) != os.path.realpath(os.path.dirname(os.path.abspath(path))):  # (nothing written yet)
        raise ValueError(f"it is a symbolic link to {target}, in another folder; the weights would go to a data "
                         f"file next to {name} there, where loading {path} does not look (give the link's target "
                         "as the output)")
    protected = set(sources) | {os.path.realpath(p) for p in keep}
    data_name = _data_file_name(name, folder, protected)
    data_path = os.path.join(folder, data_name)
    with _Temporary(folder, data_name) as data_tmp:
        with open(data_tmp.path, "r+b") as out:
            _write_external_data(model, data_name, external, out)
            out.truncate(out.tell())  # trailing holes count too
            out.flush()
            os.fsync(out.fileno())
        # the data file first: the model renamed into place then finds it
        _write_new(target, lambda f: f.write(model.SerializeToString()),
                   before_rename=lambda: data_tmp.rename(data_path))
    return data_name


def _external_sources(model: onnx.ModelProto, external: ExternalData | None) -> dict[str, str]:
    """The real path of every file `model`'s external data is read from -> one tensor read from it."""
    if external is None:
        return {}
    sources: dict[str, str] = {}
    for t, where in tensors(model):
        if t.data_location == EXTERNAL:
            try:
                sources.setdefault(external.locate(t)[0], where)
            except ValueError as e:
                raise ValueError(f"{where} {e}") from None
    return sources


def _to_move(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """The tensors save puts in the data file: every external one, and large raw initializers."""
    yield from ((t, where) for t, where in tensors(model) if t.data_location == EXTERNAL)
    for t in model.graph.initializer:  # (those just moved are external by now)
        if t.data_location != EXTERNAL and t.HasField("raw_data") and t.ByteSize() > SMALL:
            yield t, f"initializer {t.name!r}"


def _write_external_data(model: onnx.ModelProto, data_name: str, external: ExternalData | None,
                         out: BinaryIO) -> None:
    for t, where in _to_move(model):
        offset = _align(out.tell(), t)
        out.seek(offset)
        if t.data_location == EXTERNAL:
            if external is None:
                raise ValueError(f"model: {where} has external data, and its folder is not known")
            try:
                length = external.copy_to(t, out)
            except ValueError as e:
                raise ValueError(f"model: {where} {e}") from None
        else:
            data = t.raw_data
            _write_sparse(out, data)
            length = len(data)
        for field in _DATA_FIELDS:
            t.ClearField(field)
        del t.external_data[:]
        t.data_location = EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value


def _align(position: int, t: onnx.TensorProto) -> int:
    """Large tensors start on a 64 KiB boundary (so that runtimes can map them), others on 64 bytes."""
    size = data_bytes(t.data_type, math.prod(t.dims)) or t.ByteSize()
    step = 65536 if size >= (1 << 20) else 64
    return -(-position // step) * step


def _data_file_name(name: str, folder: str, protected: set[str]) -> str:
    """`name`.data, or `name`.1.data... : the first one that is not `protected` (the input model
    and the files its data are read from) and that the model being replaced does not refer to.

    Renaming the new data file over a file an old model still refers to would break that model
    if the process stopped before the new model itself is renamed into place.
    """
    taken = _locations_in(os.path.join(folder, name))

    def usable(candidate: str) -> bool:
        path = os.path.join(folder, candidate)
        # (a directory or a FIFO of that name cannot be renamed over: the next name instead)
        return (candidate not in taken and os.path.realpath(path) not in protected
                and (not os.path.lexists(path) or os.path.isfile(path)))

    candidate, k = f"{name}.data", 1
    while not usable(candidate):
        candidate, k = f"{name}.{k}.data", k + 1
    return candidate


def _locations_in(path: str) -> set[str]:
    """The external data locations the model file at `path` refers to (none if it is not one)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) or os.path.getsize(path) > PROTOBUF_LIMIT:
            return set()
        existing = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: nothing of it to keep working
        return set()
    return {_external_info(t).get("location", "") for t, _ in tensors(existing) if t.data_location == EXTERNAL}


class _Temporary:
    """A new empty file in `folder` (named after `name`), removed on exit unless renamed away."""

    def __init__(self, folder: str, name: str) -> None:
        self.folder, self.name = folder, name

    def __enter__(self) -> _Temporary:
        # (the name's first 200 bytes: a whole name of 250 bytes would pass NAME_MAX, 255 bytes)
        prefix = os.fsdecode(os.fsencode(self.name)[:200])
        fd, self.path = tempfile.mkstemp(prefix=f".{prefix}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        self.renamed = False
        return self

    def rename(self, destination: str) -> None:
        os.chmod(self.path, _new_file_mode(destination))
        os.replace(self.path, destination)
        self.renamed = True

    def __exit__(self, *exc: Any) -> None:
        if not self.renamed:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _write_new(target: str, write: Callable[[BinaryIO], Any], before_rename: Callable[[], None] | None = None) -> None:
    """Write `target` through a temporary file in its folder, renamed over it once complete."""
    folder, name = os.path.split(target)
    with _Temporary(folder, name) as tmp:
        with open(tmp.path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        tmp.rename(target)
    _sync_folder(folder)


def _new_file_mode(path: str) -> int:
    """The mode `path` has if it exists, else what open() would give a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _sync_folder(folder: str) -> None:
    """Make the renames durable (a crash after save returns keeps the new files)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
