"""Helpers every part of edje uses: atomic writes, progress bars, batching, image decoding."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "TMP_MARK",
    "atomic_folder",
    "atomic_write",
    "batches",
    "image_id",
    "load_rgb",
    "progress",
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
    """Call ``write(temp_path)`` on a temporary sibling of ``path``, flush it to disk, then rename
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


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` whole.

    On an error the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}"))
    try:
        yield temp
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


def batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def progress(total: int, show: bool | None, desc: str, unit: str = "it"):
    """A tqdm bar; ``show=None`` shows it when stderr is a terminal."""
    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() if show is None else show)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


def load_rgb(image: Any) -> Image.Image:
    """Decode ``image`` (path, bytes, ``{"bytes", "path"}`` or PIL image) to an RGB image.

    Grayscale, palette, CMYK and 16-bit images are converted; transparency is composited over
    white. Pillow's decompression-bomb limit stays on and also refuses images past the
    warning threshold. Raises ``ValueError`` with the reason when the image cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = image if isinstance(image, Image.Image) else Image.open(_as_file(image))
            img.load()
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb refused: {e}") from None
    except Exception as e:  # truncated, not an image, zero bytes, unsupported mode...
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _as_file(image: Any) -> Any:
    if isinstance(image, Mapping):  # datasets Image(decode=False): {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes | bytearray):
        return io.BytesIO(image)
    if isinstance(image, str | Path):
        return str(image)
    raise TypeError(f"expected a path, bytes or a PIL image, got {type(image).__name__}")


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
