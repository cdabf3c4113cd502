"""``python -m pybn fold`` at the file system's boundaries: failing writes, signals, special files,
links, external data, and hostile files. Every run is a child process with a timeout; every
failure must be one line on stderr with exit status 1, and must leave IN intact and no
partial OUT (nor temporary file) behind."""
from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from test_fold_onnx import bn_inits, bn_node, make_model, ops, run, vinfo, weight  # noqa: E402

F32 = TensorProto.FLOAT


def conv_bn(rng, c=32):
    """x -> Conv(3x3, c -> c) -> BatchNormalization -> y, about 37 KB of weights per c=32."""
    inits = [numpy_helper.from_array(weight(rng, (c, c, 3, 3), 9 * c).astype(np.float32), "w")] + bn_inits(rng, c)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]), bn_node("h", "y")]
    model = make_model(nodes, [vinfo("x", ["N", c, 5, 5])], [vinfo("y", 4)], inits)
    return model, {"x": rng.normal(size=(2, c, 5, 5)).astype(np.float32)}


def cli(cwd, *args, file_size_limit=None, memory_limit=None, timeout=120, code=None):
    """`python -m pybn fold args` in `cwd` (or `python -c code args`), optionally with
    RLIMIT_FSIZE (bytes a file may grow to) and RLIMIT_AS (bytes of address space)."""

    def limit():
        if file_size_limit is not None:  # Python ignores SIGXFSZ: writes past it fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "pybn", "fold"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, env=env)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def fold_here(capsys, monkeypatch):
    """Run the command in this process, in a folder: for runs that cannot hang (no special
    files, no resource limits), where a child's start-up (3 s for onnx's imports) is not needed."""
    from pybn._fold_cli import main

    def fold(cwd, *args):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return fold


def assert_one_line_failure(r, *fragments):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pybn fold: error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(folder):
    """Temporary files a write left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_folds(path, feeds, model):
    out = onnx.load(str(path))
    onnx.checker.check_model(out, full_check=True)
    assert ops(out) == {"Conv": 1}
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


# --- a write that fails part-way -------------------------------------------------------------

def test_failed_write_in_place_keeps_the_input(rng, tmp_path):
    model, _ = conv_bn(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    r = cli(tmp_path, "m.onnx", "m.onnx", file_size_limit=len(before) // 2)
    assert_one_line_failure(r, "cannot write m.onnx: File too large")
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_failed_write_leaves_no_partial_output(rng, tmp_path, existing):
    model, _ = conv_bn(rng)
    onnx.save(model, str(tmp_path / "in.onnx"))
    size = (tmp_path / "in.onnx").stat().st_size
    if existing:
        (tmp_path / "out.onnx").write_bytes(b"the old output")
    r = cli(tmp_path, "in.onnx", "out.onnx", file_size_limit=size // 2)
    assert_one_line_failure(r, "cannot write out.onnx: File too large")
    if existing:
        assert (tmp_path / "out.onnx").read_bytes() == b"the old output"
    else:
        assert not (tmp_path / "out.onnx").exists()
    assert leftovers(tmp_path) == []


def test_signal_during_the_write_removes_the_temporary_file(rng, tmp_path):
    """SIGTERM arrives while the folded model is being written (at its first fsync)."""
    model, _ = conv_bn(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    code = ("import os, signal, sys\n"
            "real = os.fsync\n"
            "def fsync(fd):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    real(fd)\n"
            "os.fsync = fsync\n"
            "from pybn._fold_cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = cli(tmp_path, "m.onnx", "m.onnx", code=code)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip() == "pybn fold: error: interrupted by SIGTERM; m.onnx was not written"
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_unexpected_error_is_one_line(rng, tmp_path, fold_here, monkeypatch):
    import pybn.onnx

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody planned for\nsecond line")

    model, _ = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    monkeypatch.setattr(pybn.onnx, "fold_model", broken)
    r = fold_here(tmp_path, "m.onnx", "out.onnx")
    assert_one_line_failure(r, "unexpected error, out.onnx was not written: RuntimeError: something nobody planned")
    assert not (tmp_path / "out.onnx").exists()


# --- what IN and OUT may be --------------------------------------------------------------------

def test_input_that_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.onnx")  # opening it would wait for a writer forever
    (tmp_path / "folder.onnx").mkdir()
    names = ("/dev/zero", "fifo.onnx", "folder.onnx")
    code = ("import sys\n"
            "from pybn._fold_cli import main\n"
            "print([main([name, 'out.onnx']) for name in sys.argv[1:]])\n")
    # one child for the three (onnx takes seconds to import); a child reading /dev/zero stops at 4 GiB
    r = cli(tmp_path, *names, code=code, timeout=60, memory_limit=4 << 30)
    assert r.stdout.strip() == "[1, 1, 1]", r.stderr
    assert r.stderr.splitlines() == [f"pybn fold: error: cannot read {name}: not a regular file" for name in names]
    assert not (tmp_path / "out.onnx").exists()


def test_input_larger_than_a_protobuf_can_be(tmp_path):
    path = tmp_path / "big.onnx"
    with open(path, "wb") as f:  # sparse: no disk space taken
        f.truncate(2**31 + 10)
    r = cli(tmp_path, "big.onnx", "out.onnx", timeout=60)
    assert_one_line_failure(r, "big.onnx is not a valid ONNX model: 2147483658 bytes, more than the 2 GiB")


def test_truncated_model_is_one_line(rng, tmp_path, fold_here):
    model, _ = conv_bn(rng)
    data = model.SerializeToString()
    for size in (len(data) // 3, len(data) - 1):
        (tmp_path / "cut.onnx").write_bytes(data[:size])
        r = fold_here(tmp_path, "cut.onnx", "out.onnx")
        assert_one_line_failure(r, "cut.onnx is not a valid ONNX model: ")
    assert not (tmp_path / "out.onnx").exists()


def test_raw_data_longer_than_its_shape_is_one_line(rng, tmp_path, fold_here):
    model, _ = conv_bn(rng, c=3)
    t = model.graph.initializer[0]
    t.raw_data = t.raw_data + bytes(8)
    onnx.checker.check_model(model)  # the checker does not see it
    onnx.save(model, str(tmp_path / "m.onnx"))
    r = fold_here(tmp_path, "m.onnx", "out.onnx")
    assert_one_line_failure(r, "m.onnx is not a valid ONNX model: initializer 'w' holds 332 bytes of raw data; its "
                               "shape (3, 3, 3, 3) and type FLOAT need 324")
    assert not (tmp_path / "out.onnx").exists()


def test_a_checker_message_on_several_lines_is_kept_whole(rng, tmp_path, fold_here):
    """onnx.checker names the node on a line of its own: the one-line message kept the first
    line only, ending in "input 'bn.var' of node:". The lines are joined."""
    model, _ = conv_bn(rng, c=3)
    var = next(t for t in model.graph.initializer if t.name == "bn.var")
    model.graph.initializer.remove(var)
    onnx.save(model, str(tmp_path / "m.onnx"))
    r = fold_here(tmp_path, "m.onnx", "out.onnx")
    assert_one_line_failure(r, "m.onnx is not a valid ONNX model: ", "input 'bn.var' of node: name: bn OpType: "
                               "BatchNormalization is not output of any previous nodes")


@pytest.mark.parametrize("out", ["folder", "missing/out.onnx", "m.onnx/out.onnx", "out.onnx/", "out.onnx/."])
def test_output_that_cannot_be_written(rng, tmp_path, fold_here, out):
    model, _ = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "folder").mkdir()
    r = fold_here(tmp_path, "m.onnx", out)
    reason = {"folder": "Is a directory", "missing/out.onnx": "No such file or directory",
              "m.onnx/out.onnx": "Not a directory", "out.onnx/": "Not a directory",
              "out.onnx/.": "Not a directory"}[out]
    assert_one_line_failure(r, f"cannot write {out}: {reason}")
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.onnx"]


def test_summary_to_a_closed_stdout_says_the_output_was_written(rng, tmp_path):
    """`fold IN OUT | head -c0`: OUT is written before the summary, so the error must not say
    it was not (the child's stdout is a pipe whose reader has gone)."""
    model, _ = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "pybn", "fold", "m.onnx", "out.onnx"], cwd=tmp_path,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert_one_line_failure(Result(proc.returncode, "", proc.stderr),
                            "out.onnx was written, but its summary could not be printed: Broken pipe")
    assert ops(onnx.load(str(tmp_path / "out.onnx"))) == {"Conv": 1} and leftovers(tmp_path) == []


def test_summary_lost_in_process_leaves_the_callers_streams(rng, tmp_path, fold_here, monkeypatch):
    """main() called in-process with a stdout that fails: the same message, and the caller's
    stdout (not the process's) and descriptors are left as they were."""
    import io
    model, _ = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))

    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    broken = Broken()
    monkeypatch.setattr(sys, "stdout", broken)
    descriptors = sorted(os.listdir("/proc/self/fd"))
    r = fold_here(tmp_path, "m.onnx", "out.onnx")
    assert sys.stdout is broken and sorted(os.listdir("/proc/self/fd")) == descriptors
    assert_one_line_failure(r, "out.onnx was written, but its summary could not be printed: Broken pipe")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_output_that_is_not_a_regular_file_is_not_replaced(rng, tmp_path, kind):
    """Renamed onto, /dev/null (as root) would become a regular file; written into, a FIFO
    without a reader would block for ever (so: a child with a timeout)."""
    model, _ = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    out = tmp_path / "out.onnx"
    if kind == "fifo":
        os.mkfifo(out)
    else:  # a node of the null device, in this folder
        os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    r = cli(tmp_path, "m.onnx", "out.onnx", timeout=60)
    assert_one_line_failure(r, "cannot write out.onnx: not a regular file")
    mode = out.lstat().st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)
    assert leftovers(tmp_path) == []


def test_output_that_is_the_inputs_external_data_is_refused(rng, tmp_path, fold_here):
    model, feeds = external_model(rng, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = fold_here(tmp_path, "m.onnx", "weights.bin")
    assert_one_line_failure(r, "cannot write weights.bin: it holds the external data of initializer 'E'")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert_same_outputs(tmp_path / "m.onnx", model, feeds)


def test_data_file_never_replaces_the_input(rng, tmp_path, fold_here):
    """OUT's data file would be OUT + ".data": here that is IN itself, which must survive."""
    model, feeds = external_model(rng, tmp_path / "in")
    os.rename(tmp_path / "in" / "m.onnx", tmp_path / "in" / "f.onnx.data")
    r = fold_here(tmp_path / "in", "f.onnx.data", "f.onnx")
    assert r.returncode == 0, r.stderr
    assert "(weights in f.onnx.1.data next to it)" in r.stdout
    assert_same_outputs(tmp_path / "in" / "f.onnx.data", model, feeds)
    assert_same_outputs(tmp_path / "in" / "f.onnx", model, feeds)


def test_data_file_name_taken_by_a_folder_goes_to_the_next_name(rng, tmp_path, fold_here):
    """A folder named OUT + ".data" cannot be renamed over: the data take the next name."""
    model, feeds = external_model(rng, tmp_path)
    (tmp_path / "f.onnx.data").mkdir()
    r = fold_here(tmp_path, "m.onnx", "f.onnx")
    assert r.returncode == 0, r.stderr
    assert "(weights in f.onnx.1.data next to it)" in r.stdout
    assert (tmp_path / "f.onnx.data").is_dir()
    assert_same_outputs(tmp_path / "f.onnx", model, feeds)


def test_an_unrelated_data_file_of_outs_name_is_replaced(rng, tmp_path, fold_here):
    """docs/folding.md: OUT.data is replaced as OUT is, when nothing being read uses it."""
    model, feeds = external_model(rng, tmp_path)
    (tmp_path / "f.onnx.data").write_bytes(b"stale")
    r = fold_here(tmp_path, "m.onnx", "f.onnx")
    assert r.returncode == 0, r.stderr
    assert external_locations(tmp_path / "f.onnx") == {"f.onnx.data"}
    assert_same_outputs(tmp_path / "f.onnx", model, feeds)


@pytest.mark.parametrize("name", ["o" * 240 + ".onnx", "é" * 120 + ".onnx"], ids=["ascii", "utf8"])
@pytest.mark.parametrize("external", [False, True])
def test_output_name_of_250_bytes(rng, tmp_path, fold_here, external, name):
    """NAME_MAX is 255 bytes: the temporary files' names must not outgrow it (a name of 125
    two-byte characters too, found by review)."""
    if external:
        model, feeds = external_model(rng, tmp_path)
    else:
        model, feeds = conv_bn(rng)
        onnx.save(model, str(tmp_path / "m.onnx"))
    if not name.isascii() and sys.getfilesystemencoding().lower() != "utf-8":
        pytest.skip("file names are not UTF-8 here")
    out = name
    r = fold_here(tmp_path, "m.onnx", out)
    assert r.returncode == 0, r.stderr
    assert_same_outputs(tmp_path / out, model, feeds)
    assert leftovers(tmp_path) == []


def test_input_named_with_bytes_that_are_not_utf8(rng, tmp_path, fold_here):
    """A file name with a Latin-1 byte (an old archive's): Python gives it as surrogate escapes,
    which onnx's checker refused, so a valid model was "not a valid ONNX model"."""
    model, feeds = conv_bn(rng)
    name = os.fsdecode(b"mod\xe9le.onnx")
    onnx.save(model, os.path.join(str(tmp_path), name))
    r = fold_here(tmp_path, name, "out.onnx")
    assert r.returncode == 0, r.stderr
    assert_folds(tmp_path / "out.onnx", feeds, model)
    (tmp_path / name).write_bytes(b"not a model")
    assert_one_line_failure(fold_here(tmp_path, name, "out.onnx"), "mod\\xe9le.onnx is not a valid ONNX model")


def test_output_named_with_bytes_that_are_not_utf8(rng, tmp_path):
    """The summary's "wrote OUT" to a strict UTF-8 stdout raised, and the command said OUT was
    not written, having written it."""
    model, feeds = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    out = os.fsdecode(b"out\xe9.onnx")
    code = "import sys; from pybn._fold_cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-c", code, "m.onnx", os.fsencode(out)], cwd=tmp_path, capture_output=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip().endswith("wrote out\\xe9.onnx")
    assert_folds(tmp_path / out, feeds, model)


def test_output_symlink_to_the_input_replaces_the_input(rng, tmp_path, fold_here):
    """A symbolic link at OUT is followed: its target (here IN itself) gets the folded model."""
    model, feeds = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "link.onnx").symlink_to("m.onnx")
    r = fold_here(tmp_path, "m.onnx", "link.onnx")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "link.onnx").is_symlink()
    assert_folds(tmp_path / "m.onnx", feeds, model)
    assert leftovers(tmp_path) == []


def test_output_hard_link_to_the_input_leaves_the_input(rng, tmp_path, fold_here):
    """A hard link shares the file: written in place it would change IN; replaced, it does not."""
    model, feeds = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    before = (tmp_path / "m.onnx").read_bytes()
    os.link(tmp_path / "m.onnx", tmp_path / "hard.onnx")
    r = fold_here(tmp_path, "m.onnx", "hard.onnx")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert_folds(tmp_path / "hard.onnx", feeds, model)


def test_output_file_mode(rng, tmp_path, fold_here):
    model, _ = conv_bn(rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "old.onnx").write_bytes(b"x")
    os.chmod(tmp_path / "old.onnx", 0o640)
    for out in ("new.onnx", "old.onnx"):
        assert fold_here(tmp_path, "m.onnx", out).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "new.onnx").stat().st_mode & 0o777 == 0o666 & ~umask  # as a new file gets
    assert (tmp_path / "old.onnx").stat().st_mode & 0o777 == 0o640  # as it was


# --- external data ------------------------------------------------------------------------------

def external_model(rng, folder, location="weights.bin"):
    """conv_bn plus a Gather of a 16 KB initializer; the weights over 1 KB in the data file `location`."""
    model, feeds = conv_bn(rng)
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=4096).astype(np.float32), "E"))
    model.graph.node.append(helper.make_node("Gather", ["E", "i"], ["z"], name="gather"))
    model.graph.input.append(vinfo("i", [3], TensorProto.INT64))
    model.graph.output.append(vinfo("z", [3]))
    feeds["i"] = np.array([0, 7, 4095])
    folder.mkdir(exist_ok=True)
    stored = onnx.ModelProto()
    stored.CopyFrom(model)  # onnx.save makes the tensors of the model it saves external
    onnx.save(stored, str(folder / "m.onnx"), save_as_external_data=True, location=location)
    return model, feeds


def run_path(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def external_locations(path):
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}


def assert_same_outputs(path, model, feeds):
    for got, want in zip(run_path(path, feeds), run(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_external_data_stays_external_next_to_the_output(rng, tmp_path, fold_here):
    model, feeds = external_model(rng, tmp_path / "in")
    (tmp_path / "out").mkdir()
    r = fold_here(tmp_path, "in/m.onnx", "out/f.onnx")
    assert r.returncode == 0, r.stderr
    assert "wrote out/f.onnx (weights in f.onnx.data next to it)" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.onnx", "f.onnx.data"]
    assert external_locations(tmp_path / "out" / "f.onnx") == {"f.onnx.data"}
    onnx.checker.check_model(str(tmp_path / "out" / "f.onnx"))
    assert_same_outputs(tmp_path / "out" / "f.onnx", model, feeds)


def test_external_data_in_place_twice(rng, tmp_path, fold_here):
    """IN == OUT: the new data file never takes the name of one the old model still uses."""
    model, feeds = external_model(rng, tmp_path, location="m.onnx.data")
    for expected in ("m.onnx.1.data", "m.onnx.data"):  # the names alternate
        r = fold_here(tmp_path, "m.onnx", "m.onnx")
        assert r.returncode == 0, r.stderr
        assert external_locations(tmp_path / "m.onnx") == {expected}
        assert_same_outputs(tmp_path / "m.onnx", model, feeds)
    assert leftovers(tmp_path) == []


def test_output_symlink_into_another_folder_with_external_data_is_refused(rng, tmp_path, fold_here):
    """OUT a link into another folder (current.onnx -> models/deploy.onnx): the data file would be
    written next to the target, where loading OUT does not look (onnx resolves external data in
    the folder of the path it is given). Refused, naming OUT, before anything is written."""
    external_model(rng, tmp_path)
    (tmp_path / "models").mkdir()
    deploy = tmp_path / "models" / "deploy.onnx"
    deploy.write_bytes(b"the deployed model")
    (tmp_path / "current.onnx").symlink_to(deploy)
    r = fold_here(tmp_path, "m.onnx", "current.onnx")
    assert_one_line_failure(r, "cannot write current.onnx: it is a symbolic link to", "in another folder")
    assert deploy.read_bytes() == b"the deployed model"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["deploy.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.onnx", "m.onnx", "models", "weights.bin"]
    assert (tmp_path / "current.onnx").is_symlink()


def test_output_symlink_in_the_targets_folder_with_external_data_loads_through_the_link(rng, tmp_path, fold_here):
    """A link to a file of its own folder is followed as before: the data file goes next to the
    target, which is next to the link too, so the model loads through either path; and a model
    without a data file is written through a link into another folder."""
    model, feeds = external_model(rng, tmp_path / "in")
    (tmp_path / "deploy.onnx").write_bytes(b"old")
    (tmp_path / "current.onnx").symlink_to("deploy.onnx")
    r = fold_here(tmp_path, "in/m.onnx", "current.onnx")
    assert r.returncode == 0, r.stderr
    assert "wrote current.onnx (weights in deploy.onnx.data next to it)" in r.stdout
    assert (tmp_path / "current.onnx").is_symlink()
    for path in (tmp_path / "current.onnx", tmp_path / "deploy.onnx"):
        onnx.load(str(path))
        assert_same_outputs(path, model, feeds)
    small, small_feeds = conv_bn(rng)
    onnx.save(small, str(tmp_path / "small.onnx"))
    (tmp_path / "models").mkdir()
    (tmp_path / "latest.onnx").symlink_to(tmp_path / "models" / "small.onnx")
    r = fold_here(tmp_path, "small.onnx", "latest.onnx")
    assert r.returncode == 0, r.stderr
    assert_folds(tmp_path / "latest.onnx", small_feeds, small)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["small.onnx"]


def test_failed_write_with_external_data_keeps_the_input(rng, tmp_path):
    external_model(rng, tmp_path, location="m.onnx.data")
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = cli(tmp_path, "m.onnx", "m.onnx", file_size_limit=len(files["m.onnx.data"]) // 2)
    assert_one_line_failure(r, "cannot write m.onnx: File too large")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("location", ["../secret.bin", "/abs/secret.bin", "link.bin", "inner_link.bin",
                                      "missing.bin", "sub/../../secret.bin", "short.bin", "fifo.bin"])
def test_hostile_external_data_locations(rng, tmp_path, fold_here, location):
    """Locations outside the model's folder, links out of it, missing and short files: refused."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 64)
    if location == "link.bin":
        (folder / "link.bin").symlink_to(secret)
    if location == "inner_link.bin":  # inside the folder, but onnx refuses links: so does pybn
        (folder / "inner.bin").write_bytes(bytes(324))
        (folder / "inner_link.bin").symlink_to(folder / "inner.bin")
    if location == "short.bin":
        (folder / "short.bin").write_bytes(bytes(100))
    if location == "fifo.bin":  # reading it would wait for a writer for ever
        os.mkfifo(folder / "fifo.bin")
    model, _ = conv_bn(rng, c=3)
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location.replace("/abs", str(tmp_path))), ("offset", "0"), ("length", "324")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(folder / "m.onnx"))
    reason = {"../secret.bin": "outside the model's folder", "/abs/secret.bin": "not a path relative to",
              "link.bin": "leads outside the model's folder", "inner_link.bin": "a symbolic link",
              "missing.bin": "cannot be read (No such file or directory)",
              "sub/../../secret.bin": "outside the model's folder", "short.bin": "past the end of the file",
              "fifo.bin": "not a regular file"}[location]
    # the command, and pybn's own reader alone (the checker of older onnx versions let such
    # locations through); in a child when a regression could open the FIFO and wait for ever
    code = ("import sys, onnx\n"
            "from pybn._onnx_files import ExternalData\n"
            "t = onnx.load('model/m.onnx', load_external_data=False).graph.initializer[0]\n"
            "try:\n"
            "    ExternalData('model').read(t)\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    if location == "fifo.bin":
        r = cli(tmp_path, "model/m.onnx", "out.onnx", timeout=60)
        reader = cli(tmp_path, code=code, timeout=60).stdout
    else:
        r = fold_here(tmp_path, "model/m.onnx", "out.onnx")
        from pybn._onnx_files import ExternalData

        with pytest.raises(ValueError) as info:
            ExternalData(str(folder)).read(model.graph.initializer[0])
        reader = str(info.value)
    assert_one_line_failure(r, "model/m.onnx is not a valid ONNX model")
    assert not (tmp_path / "out.onnx").exists()
    assert reason in reader


def test_external_data_not_loaded_is_reported_by_the_api(rng, tmp_path):
    import pybn.onnx

    model, feeds = external_model(rng, tmp_path)
    unloaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    folded, report = pybn.onnx.fold(unloaded, return_report=True)
    assert report == [pybn.onnx.NotFolded("BatchNormalization", ("bn",),
                                          "with conv: 'w' is external data that was not loaded")]
