"""Output folders: checked up front, never written through links out of them, full disks stop cleanly."""
from __future__ import annotations

import csv
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xaicli.descriptors import BatchOutput, InputItem, WriterContext
from xaicli.errors import InputError, StorageError, UsageError
from xaicli.io import TEMP_SUFFIX, atomic_write, atomic_write_bytes
from xaicli.outdir import OutputLock, check_output_dir, prepare_output_dir, remove_temporaries
from xaicli.registry import create_registry

ROOT_USER = os.geteuid() == 0


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs root; skipped where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not ROOT_USER or run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    assert run("umount", str(mnt)).returncode == 0


@pytest.fixture
def locked_folder(tmp_path):
    """A folder nobody may create files in, root included: mode 0555, or for root the immutable flag
    (chattr +i), or else a read-only tmpfs."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if not ROOT_USER:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif shutil.which("chattr") and run("chattr", "+i", str(folder)).returncode == 0:
        yield folder
        run("chattr", "-i", str(folder))
    elif run("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)).returncode == 0:
        yield folder
        run("umount", str(folder))
    else:
        pytest.skip("no way to make a folder root cannot write")


def usage_error(path: Path, inputs: list[Path] = ()) -> str:
    with pytest.raises(UsageError) as caught:
        check_output_dir(path, inputs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_output_path_that_is_a_file_or_below_one(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    assert usage_error(file).endswith("is a file")
    assert f"cannot be created: {file} is a file" in usage_error(file / "out")
    assert f"cannot be created: {file} is a file" in usage_error(file / "a" / "b")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    assert "broken symbolic link" in usage_error(tmp_path / "dangling")


@pytest.mark.parametrize("where", ["/proc/xai-out", "/sys/xai-out", "/proc/self/xai-out", "/sys"])
def test_kernel_file_systems_are_refused(where):
    assert "kernel file system" in usage_error(Path(where))


def test_folder_nobody_can_write(locked_folder):
    message = usage_error(locked_folder / "out")
    assert "not writable" in message and str(locked_folder) in message
    assert "not writable" in usage_error(locked_folder)


def test_read_only_file_system(small_fs):
    assert run("mount", "-o", "remount,ro", str(small_fs)).returncode == 0
    assert "read-only file system" in usage_error(small_fs / "out")


def test_full_disk_is_found_by_the_probe(small_fs):
    with pytest.raises(StorageError):
        atomic_write_bytes(small_fs / "filler", b"\0" * 200_000)
    assert list(small_fs.iterdir()) == []
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to the last page
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC
    assert "no space left on device" in usage_error(small_fs / "out")
    assert [p.name for p in small_fs.iterdir()] == ["filler"]  # the probe left nothing


def test_output_folder_that_is_an_input_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    assert "also an input folder" in usage_error(images, [images])
    check_output_dir(images / "out", [images])  # an output folder inside the inputs is excluded by discovery


def test_good_folders_pass_and_are_left_as_they_were(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", [])
    assert not (tmp_path / "new").exists()
    check_output_dir(tmp_path, [])
    assert list(tmp_path.iterdir()) == []
    out = prepare_output_dir(tmp_path / "made" / "here", [])
    assert out.is_dir()


def test_fixed_subfolders_leading_outside_are_refused_up_front(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "heatmaps").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="heatmaps leads outside it"):
        prepare_output_dir(out, [])
    (out / "heatmaps").unlink()
    (out / "inside").mkdir()
    (out / "arrays").symlink_to(out / "inside")  # a link that stays inside is fine
    assert prepare_output_dir(out, []) == out


def test_writes_never_follow_a_link_out_of_the_output_folder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "heatmaps").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "heatmaps" / "sal").symlink_to(elsewhere)
    with pytest.raises(InputError) as caught:
        atomic_write_bytes(out / "heatmaps" / "sal" / "sub" / "a.png", b"png", root=out)
    assert caught.value.stage == "write" and "leads outside the output folder" in str(caught.value)
    assert list(elsewhere.iterdir()) == []  # not even the subfolder was created there
    with pytest.raises(InputError, match="not inside the output folder"):
        atomic_write_bytes(out / ".." / "escape.txt", b"x", root=out)
    assert not (tmp_path / "escape.txt").exists()
    (out / "real").mkdir()
    (out / "arrays").symlink_to(out / "real")
    atomic_write_bytes(out / "arrays" / "sal" / "a.npz", b"ok", root=out)
    assert (out / "real" / "sal" / "a.npz").read_bytes() == b"ok"


def batch(n: int, size: int = 32) -> BatchOutput:
    rng = np.random.default_rng(0)
    items = [InputItem(Path(f"/data/{i}.png"), f"d/{i}.png") for i in range(n)]
    return BatchOutput(
        output="sal", method="saliency", params={}, items=items,
        inputs=np.zeros((n, 1, size, size), np.float32), images=[np.zeros((size, size, 3), np.uint8)] * n,
        crops=[(0, 0, size, size)] * n, resized=[(size, size)] * n, target=np.zeros(n, np.int64),
        logit=np.zeros(n, np.float32), prob=np.zeros(n, np.float32),
        relevance=rng.standard_normal((n, 1, size, size)).astype(np.float32),
    )


@pytest.fixture(scope="module")
def registry():
    from xaicli_plugins.writers import npz, png, summary

    return create_registry(extra=[png, npz, summary], entry_points=False)


@pytest.mark.parametrize("writer", ["png", "npz"])
def test_writers_refuse_a_linked_folder_out(tmp_path, registry, writer):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / {"png": "heatmaps", "npz": "arrays"}[writer]).symlink_to(elsewhere)
    sink = registry.writer(writer).open(WriterContext(out))
    with pytest.raises(InputError, match="leads outside"):
        sink.write(batch(2))
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO])
def test_storage_failures_raise_storage_error_and_leave_no_temporary(tmp_path, code):
    path = tmp_path / "out" / "a.bin"
    atomic_write_bytes(path, b"before", root=tmp_path / "out")

    def fail(fh):
        fh.write(b"partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(StorageError) as caught:
        atomic_write(path, fail, root=tmp_path / "out")
    assert caught.value.errno == code and caught.value.path == str(path) and str(path) in str(caught.value)
    assert path.read_bytes() == b"before"
    assert [p.name for p in path.parent.iterdir()] == ["a.bin"]


def test_other_os_errors_stay_per_input(tmp_path):
    def fail(fh):
        raise OSError(errno.ENAMETOOLONG, "File name too long")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "a.bin", fail)
    assert not isinstance(caught.value, StorageError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["png", "npz"])
def test_full_disk_mid_batch_keeps_finished_files_whole(small_fs, registry, writer):
    sink = registry.writer(writer).open(WriterContext(small_fs / "out"))
    with pytest.raises(StorageError) as caught:
        sink.write(batch(64, size=48))  # 64 random 48x48 maps: ~600 KiB as npz, ~250 KiB as png
    assert caught.value.errno == errno.ENOSPC
    written = sorted((small_fs / "out").rglob(f"*.{writer}"))
    assert 0 < len(written) < 64
    for path in written:
        if writer == "npz":
            with np.load(path, allow_pickle=False) as npz:
                assert npz["relevance"].shape == (1, 48, 48)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
    assert not list(small_fs.rglob(f"*{TEMP_SUFFIX}"))


def test_metrics_csv_on_a_full_disk_keeps_whole_rows_and_no_temporary(small_fs, registry):
    sink = registry.writer("metrics_csv").open(WriterContext(small_fs))
    few, many = batch(10, size=1), batch(2000, size=1)
    few.scores = {"metric": np.arange(10, dtype=np.float64) / 7}
    many.scores = {f"metric{k}": np.arange(2000, dtype=np.float64) / 7 for k in range(8)}  # ~600 KB of rows
    sink.write(few)
    with pytest.raises(StorageError):
        sink.write(many)
    sink.close({})
    with open(small_fs / "metrics.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["input", "method", "metric", "score"] and len(rows) == 11  # the failed batch left no part row
    assert [float(r[3]) for r in rows[1:]] == list(np.arange(10) / 7)
    assert [p.name for p in small_fs.iterdir()] == ["metrics.csv"]


def test_metrics_csv_that_cannot_close_leaves_the_earlier_file(small_fs, registry):
    (small_fs / "metrics.csv").write_text("input,method,metric,score\r\n" + "a.png,sal,m,1.0\r\n" * 2500)  # 42 KB
    sink = registry.writer("metrics_csv").open(WriterContext(small_fs))
    with pytest.raises(StorageError):  # the earlier rows are copied over at close: no room for both
        sink.close({})
    assert [p.name for p in small_fs.iterdir()] == ["metrics.csv"]
    assert len((small_fs / "metrics.csv").read_text().splitlines()) == 2501


def test_second_run_into_a_folder_is_refused_while_the_first_holds_it(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(UsageError) as caught:
            OutputLock(tmp_path).__enter__()
        assert f"output folder {tmp_path} is in use by another xai run (pid {os.getpid()})" in str(caught.value)
    with OutputLock(tmp_path):  # released on exit
        pass


def test_lock_is_released_when_its_run_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from xaicli.outdir import OutputLock\n"
         f"with OutputLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"pid {holder.pid}"):
            OutputLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(tmp_path):
        pass


def test_temporaries_of_killed_runs_are_swept(tmp_path):
    (tmp_path / "heatmaps" / "sal").mkdir(parents=True)
    left = [tmp_path / f".run.json.abc{TEMP_SUFFIX}", tmp_path / "heatmaps" / "sal" / f".a.png.x1{TEMP_SUFFIX}"]
    for path in left:
        path.write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("the user's own file")
    assert remove_temporaries(tmp_path) == 2
    assert not any(p.exists() for p in left) and (tmp_path / "notes.tmp").exists()
