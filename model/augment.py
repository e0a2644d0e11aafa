"""Training-time augmentation that erases acquisition cues: scale, framing, colour, blur, JPEG,
vignettes and dark dermatoscope corners, hairs. TensorFlow ops on whole batches, seeded.

Every function takes float32 images, shape (batch, H, W, 3), values 0..255, and a stateless
seed, shape (2,), and returns the same shape and range. Used in training only.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf


def _uniform(seed: Any, shape: Any, low: float, high: float) -> Any:
    return tf.random.stateless_uniform(shape, seed, low, high)


def _chance(seed: Any, batch: Any, p: float) -> Any:
    """Per image: True with probability p, shape (batch, 1, 1, 1)."""
    return tf.reshape(_uniform(seed, [batch], 0.0, 1.0) < p, [-1, 1, 1, 1])


def random_geometry(images: Any, seed: Any, out_size: tuple[int, int], *,
                    scale: tuple[float, float] = (0.8, 1.0),
                    aspect: tuple[float, float] = (0.85, 1.18)) -> Any:
    """Random resized crop, any rotation and flips in one projective transform (reflect fill).

    The crop covers `scale` of the image's side, with an aspect ratio in `aspect`; the output has
    `out_size` (height, width).
    """
    batch = tf.shape(images)[0]
    in_h, in_w = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    out_h, out_w = out_size
    seeds = tf.random.experimental.stateless_split(seed, 6)
    side = _uniform(seeds[0], [batch], *scale)
    ratio = tf.exp(_uniform(seeds[1], [batch], math.log(aspect[0]), math.log(aspect[1])))
    sx = side * tf.sqrt(ratio) * in_w / out_w
    sy = side / tf.sqrt(ratio) * in_h / out_h
    flip = tf.where(_uniform(seeds[2], [batch], 0.0, 1.0) < 0.5, -1.0, 1.0)
    sx = sx * flip
    theta = _uniform(seeds[3], [batch], -math.pi, math.pi)
    # Shift the crop's centre by up to a quarter of the room it leaves.
    room = tf.maximum(1.0 - side, 0.0) / 2.0
    tx = _uniform(seeds[4], [batch], -1.0, 1.0) * room * in_w * 0.5
    ty = _uniform(seeds[5], [batch], -1.0, 1.0) * room * in_h * 0.5
    cos, sin = tf.cos(theta), tf.sin(theta)
    # input = centre_in + t + R(theta) @ S @ (output - centre_out)
    a0, a1 = cos * sx, -sin * sy
    b0, b1 = sin * sx, cos * sy
    cx_o, cy_o = (out_w - 1) / 2.0, (out_h - 1) / 2.0
    a2 = (in_w - 1) / 2.0 + tx - a0 * cx_o - a1 * cy_o
    b2 = (in_h - 1) / 2.0 + ty - b0 * cx_o - b1 * cy_o
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.constant([out_h, out_w]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")


def random_colour(images: Any, seed: Any) -> Any:
    """Colour cast (per-channel gain), brightness, contrast, saturation, hue and gamma."""
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 6)
    x = images / 255.0
    x = x * _uniform(seeds[0], [batch, 1, 1, 3], 0.8, 1.2)
    x = x * _uniform(seeds[1], [batch, 1, 1, 1], 0.75, 1.25)
    mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * _uniform(seeds[2], [batch, 1, 1, 1], 0.7, 1.3) + mean
    grey = tf.reduce_mean(x, axis=-1, keepdims=True)
    x = grey + (x - grey) * _uniform(seeds[3], [batch, 1, 1, 1], 0.6, 1.4)
    x = tf.clip_by_value(x, 0.0, 1.0)
    hsv = tf.image.rgb_to_hsv(x)
    hue = tf.math.floormod(hsv[..., :1] + _uniform(seeds[4], [batch, 1, 1, 1], -0.05, 0.05), 1.0)
    x = tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1))
    x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), _uniform(seeds[5], [batch, 1, 1, 1], 0.8, 1.25))
    return x * 255.0


def random_artefacts(images: Any, seed: Any, *, hair_p: float = 0.3, vignette_p: float = 0.3,
                     corner_p: float = 0.2) -> Any:
    """Simulated hairs (dark lines), a vignette, and the dark corners of a round dermatoscope."""
    batch = tf.shape(images)[0]
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    seeds = tf.random.experimental.stateless_split(seed, 9)
    ys = tf.linspace(-1.0, 1.0, height)[:, None]
    xs = tf.linspace(-1.0, 1.0, width)[None, :]
    grid_y, grid_x = ys * tf.ones_like(xs), xs * tf.ones_like(ys)  # (H, W)
    radius = tf.sqrt(grid_x**2 + grid_y**2)[None, :, :, None]  # (1, H, W, 1), 0 at the centre

    # Hairs: up to 4 straight dark lines per image, 1-2 px wide at 160 px.
    lines = 4
    px = _uniform(seeds[0], [batch, lines, 1, 1], -1.0, 1.0)
    py = _uniform(seeds[1], [batch, lines, 1, 1], -1.0, 1.0)
    angle = _uniform(seeds[2], [batch, lines, 1, 1], 0.0, math.pi)
    present = _uniform(seeds[3], [batch, lines, 1, 1], 0.0, 1.0) < 0.6
    distance = tf.abs((grid_x - px) * tf.sin(angle) - (grid_y - py) * tf.cos(angle))
    half_width = 1.2 / tf.cast(width, tf.float32)
    strength = tf.where(present, tf.clip_by_value(1.5 - distance / half_width, 0.0, 1.0), 0.0)
    hair = tf.reduce_max(strength, axis=1)[..., None]  # (batch, H, W, 1)
    hair = hair * tf.cast(_chance(seeds[4], batch, hair_p), tf.float32)
    hair_colour = _uniform(seeds[5], [batch, 1, 1, 1], 10.0, 70.0) * tf.constant([1.0, 0.8, 0.7])
    x = images * (1.0 - hair) + hair_colour * hair

    # Vignette: brightness falling off towards the corners.
    fall = _uniform(seeds[6], [batch, 1, 1, 1], 0.2, 0.6)
    vignette = 1.0 - fall * tf.clip_by_value((radius - 0.6) / 0.8, 0.0, 1.0) ** 2
    x = tf.where(_chance(seeds[7], batch, vignette_p), x * vignette, x)

    # Dark corners: outside a circle of radius 0.95..1.3 (1 = the edge's midpoint) nearly black.
    seeds2 = tf.random.experimental.stateless_split(seeds[8], 2)
    edge = _uniform(seeds2[0], [batch, 1, 1, 1], 0.95, 1.3)
    outside = tf.clip_by_value((radius - edge) / 0.05, 0.0, 1.0)
    dark = x * (1.0 - outside) + 8.0 * outside
    return tf.where(_chance(seeds2[1], batch, corner_p), dark, x)


def random_blur_and_noise(images: Any, seed: Any, *, blur_p: float = 0.1) -> Any:
    """A Gaussian blur (sigma 1.2 px) on some images, sensor noise on all (sigma 0..3)."""
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    taps = tf.exp(-tf.range(-2.0, 3.0) ** 2 / (2 * 1.2**2))
    taps = taps / tf.reduce_sum(taps)
    kernel = tf.tile((taps[:, None] * taps[None, :])[:, :, None, None], [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "SAME")
    x = tf.where(_chance(seeds[0], batch, blur_p), blurred, images)
    sigma = _uniform(seeds[1], [batch, 1, 1, 1], 0.0, 3.0)
    return x + sigma * tf.random.stateless_normal(tf.shape(x), seeds[1])


def random_jpeg(images: Any, seed: Any, *, p: float = 0.25) -> Any:
    """Re-compress some images as JPEG at quality 50..95 (the blockiness of an export)."""
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    per_image = tf.random.experimental.stateless_split(seeds[0], batch)

    def recompress(args: Any) -> Any:
        image, image_seed = args
        encoded = tf.image.stateless_random_jpeg_quality(image / 255.0, 50, 95, image_seed)
        return encoded * 255.0

    clipped = tf.clip_by_value(images, 0.0, 255.0)
    compressed = tf.map_fn(recompress, (clipped, per_image), fn_output_signature=tf.float32)
    return tf.where(_chance(seeds[1], batch, p), compressed, clipped)


def augment_batch(images: Any, seed: Any, out_size: tuple[int, int]) -> Any:
    """All of the above, in the order a camera would add them; output (batch, *out_size, 3)."""
    seeds = tf.random.experimental.stateless_split(seed, 5)
    x = random_geometry(images, seeds[0], out_size)
    x = random_artefacts(x, seeds[1])
    x = random_colour(x, seeds[2])
    x = random_blur_and_noise(x, seeds[3])
    x = random_jpeg(x, seeds[4])
    return tf.clip_by_value(x, 0.0, 255.0)


def mild_augment_batch(images: Any, seed: Any, out_size: tuple[int, int]) -> Any:
    """v1's augmentation: any rotation, flips, zoom of +-15 %, brightness +-15 % and contrast
    +-20 % (about the image's mean, so saturation moves with it); no colour cast, no hue change.

    Output (batch, *out_size, 3), values 0..255.
    """
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    x = random_geometry(images, seeds[0], out_size, scale=(0.85, 1.0), aspect=(0.92, 1.08))
    x = x * _uniform(seeds[1], [batch, 1, 1, 1], 0.85, 1.15)
    mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * _uniform(seeds[2], [batch, 1, 1, 1], 0.8, 1.2) + mean
    return tf.clip_by_value(x, 0.0, 255.0)


def moderate_augment_batch(images: Any, seed: Any, out_size: tuple[int, int]) -> Any:
    """Geometry, hairs, vignettes and dark corners, colour casts: `augment_batch` without its
    blur, noise and JPEG steps, which cost a 2-core machine more than the network's own step.

    Output (batch, *out_size, 3), values 0..255.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    x = random_geometry(images, seeds[0], out_size, scale=(0.8, 1.0))
    x = random_artefacts(x, seeds[1])
    x = random_colour(x, seeds[2])
    return tf.clip_by_value(x, 0.0, 255.0)


#: The augmentations `TrainConfig.augmentation` names.
AUGMENTATIONS = {"heavy": augment_batch, "moderate": moderate_augment_batch,
                 "mild": mild_augment_batch}
