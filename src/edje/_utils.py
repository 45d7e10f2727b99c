"""Helpers every part of edje uses: atomic writes, progress bars, batching, image decoding."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import stat
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageOps

__all__ = [
    "IMAGE_SUFFIXES",
    "OWNED_MARK",
    "TMP_MARK",
    "atomic_folder",
    "atomic_write",
    "batches",
    "image_id",
    "load_rgb",
    "open_regular",
    "progress",
    "refuse_foreign_folder",
    "require",
]

# The image files edje reads from a folder (encode, data folders, the search page's thumbnails).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def image_id(name: str | os.PathLike) -> str:
    """The one image-id rule of every way of encoding and loading: an image file's path (relative
    to its folder, `/`-separated, or a file name as a data set's id column holds it) without
    its image suffix. `"photos/img00.png"` -> `"photos/img00"`, `"1000092795.jpg"` ->
    `"1000092795"`; other values (`"391895"`) stay as they are.

    Example:
        >>> image_id("sub/deep.JPG"), image_id("1000092795.jpg"), image_id("391895")
        ('sub/deep', '1000092795', '391895')
    """
    text = str(name).replace(os.sep, "/")
    suffix = Path(text).suffix
    return text[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else text


# In the name of every temporary file or folder edje writes, so cleanup finds only its own.
TMP_MARK = ".tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call `write(temp_path)` on a temporary sibling of `path`, flush it to disk, then rename
    it into place: readers see the old file or the whole new one, never a partial one."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; a file edje writes is 0644
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """Open `path` for reading in binary, refusing anything but a regular file: a FIFO would
    block the reader forever, a device never end. `OSError` names the path and what it is."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else (
                "a device or socket")  # fmt: skip
            raise OSError(f"{path} is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


# In every folder `atomic_folder` writes: what edje may replace later (see `refuse_foreign_folder`).
OWNED_MARK = ".edje-written"


def refuse_foreign_folder(path: str | os.PathLike, action: str = "replace") -> None:
    """The one rule for folders edje writes whole: never delete or overwrite what edje did not
    create. `path` may be replaced only when it is missing, an empty folder, or a folder edje
    wrote (it holds `OWNED_MARK`); else `FileExistsError` names it, before any work is done."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"will not {action} {path}: it is not a folder edje wrote")
    if (path / OWNED_MARK).is_file() or not any(path.iterdir()):
        return
    raise FileExistsError(
        f"will not {action} {path}: it holds files edje did not write; choose a new or empty "
        "folder (or remove it yourself)"
    )


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path` whole.

    On an error the temporary folder is removed and `path` is left as it was. An existing
    `path` is replaced only if edje wrote it (`refuse_foreign_folder`), checked first.
    """
    path = Path(path)
    refuse_foreign_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}"))
    try:
        yield temp
        (temp / OWNED_MARK).touch()
        refuse_foreign_folder(path)  # again: a user may have put files there meanwhile
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():  # swap: move the old one aside first, so no moment lacks a folder
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}old-"))
            os.replace(path, old / path.name)
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # gone already after a successful rename


def require(module: str, extra: str, who: str) -> Any:
    """`import module`, or an `ImportError` naming the edje extra that installs it (the core
    install leaves training, serving, FAISS and plots out)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(
            f"{who} needs {package}, which edje's core install leaves out: "
            f"pip install 'edje[{extra}]'"
        ) from None


def batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of `items` of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def progress(total: int, show: bool | None, desc: str, unit: str = "it"):
    """A tqdm bar; `show=None` shows it when stderr is a terminal."""
    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() if show is None else show)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


def load_rgb(image: Any) -> Image.Image:
    """Decode `image` (path, bytes, `{"bytes", "path"}`, uint8 array or PIL image) to an RGB
    image.

    The EXIF orientation tag is applied (a phone photo stored sideways comes back upright, as
    `transformers.image_utils.load_image` and `datasets.Image` give it). Grayscale, palette,
    CMYK and 16-bit images are converted; transparency is composited over white. Pillow's
    decompression-bomb limit stays on and also refuses images past the warning threshold.

    Raises:
        ValueError: the image cannot be decoded (naming the reason).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = image if isinstance(image, Image.Image) else _opened(image)
            img.load()
            return _to_rgb(_upright(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb refused: {e}") from None
    except Exception as e:  # truncated, not an image, zero bytes, unsupported mode...
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _opened(image: Any) -> Image.Image:
    if hasattr(image, "__array_interface__"):  # a numpy array of pixels, as Image.fromarray
        return _from_array(image)
    return Image.open(_as_file(image))


def _from_array(array: Any) -> Image.Image:
    shape, dtype = tuple(array.shape), str(array.dtype)
    if dtype != "uint8" or not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))):
        raise TypeError(
            f"an image array must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; "
            f"got {dtype} {list(shape)}"
        )
    return Image.fromarray(array[..., 0] if len(shape) == 3 and shape[2] == 1 else array)


def _as_file(image: Any) -> Any:
    if isinstance(image, Mapping):  # datasets Image(decode=False): {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes | bytearray):
        return io.BytesIO(image)
    if isinstance(image, str | Path):
        return str(image)
    raise TypeError(
        f"expected a path, bytes, a uint8 array or a PIL image, got {type(image).__name__}"
    )


def _upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation tag says (a new image; the caller's is untouched)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return img  # nothing to turn: no copy
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit grey -> 8-bit
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of what is RGB already
