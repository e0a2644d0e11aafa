"""How the out-of-scope rule treats lesion images its statistics never saw.

The shipped model's scope statistics (feature mean and whitening, `model.scope`) were fitted on
every image of the training folder, its held-out ones included, and its limit is 1.1 times the
farthest of them. So "0 of 466 held-out lesions out of scope" measures images the statistics
saw. This script fits the same statistics on the images the networks trained on only, and then
measures the held-out images (among them the first acquisition stretch, held out whole, which
stands in for a new camera) and the test suite's generated non-lesion pictures, against:

- the limit as the shipped rule sets it (1.1 x the farthest fitted image);
- 1.1 x the farthest held-out lesion image (a limit that keeps every one of them in scope).

    python benchmarks/scope_unseen.py [--data ../shared/data/isic-train]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.architectures import scope_features
from model.card import shipped_model_path
from model.data import in_first_chunk, scan_folder
from model.inference import Classifier
from model.scope import SCOPE_MARGIN, distance, fit_whitening, scope_threshold
from tests.test_model_shipped import _non_lesion_pictures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/isic-train"))
    args = parser.parse_args()

    import keras

    classifier = Classifier(shipped_model_path())
    held_out = set(classifier.card.training_set["validation_sha256"])
    samples = scan_folder(args.data, tuple(classifier.classes)).samples
    images = np.stack([classifier.decode(s.path) for s in samples])
    held = np.asarray([s.sha256 in held_out for s in samples])
    melanoma = np.asarray([s.label == classifier.classes.index("melanoma") for s in samples])
    chunk = np.asarray([in_first_chunk(s.path) for s in samples])
    # The first network measures the scope, as in the shipped model.
    wrapped = classifier.model.get_layer("member_0")
    network = keras.Model(wrapped.input, wrapped.outputs[0], name="melanonet")
    features = scope_features(network)
    fitted = features.predict(images, batch_size=64, verbose=0)

    mean, whitening = fit_whitening(fitted[~held])
    trained = distance(fitted[~held], mean, whitening)
    unseen = distance(fitted[held], mean, whitening)
    limits = {"shipped rule (1.1 x farthest fitted image)": scope_threshold(trained),
              "1.1 x farthest held-out lesion": float(unseen.max() * SCOPE_MARGIN)}
    print(f"statistics fitted on the {int((~held).sum())} training images; "
          f"{int(held.sum())} held-out images, {int((held & chunk).sum())} of them from the "
          f"first stretch (never trained on)")
    print(f"held-out distances: median {np.median(unseen):.2f}, 99th percentile "
          f"{np.percentile(unseen, 99):.2f}, max {unseen.max():.2f}")

    with tempfile.TemporaryDirectory() as folder:
        pictures = _non_lesion_pictures(Path(folder))
        kinds = {kind: distance(features.predict(np.stack([classifier.decode(p) for p in paths]),
                                                 verbose=0), mean, whitening)
                 for kind, paths in pictures.items()}
    for name, limit in limits.items():
        outside = unseen > limit
        print(f"\nlimit {limit:.3f}, {name}:")
        print(f"  held-out lesions out of scope: {int(outside.sum())} of {int(held.sum())} "
              f"({int((outside & melanoma[held]).sum())} melanomas); in the first stretch "
              f"{int((outside & chunk[held]).sum())} of {int((held & chunk).sum())}")
        for kind, values in kinds.items():
            print(f"  {kind:9s} out of scope: {int((values > limit).sum())} of {len(values)} "
                  f"(distances {', '.join(f'{v:.2f}' for v in sorted(values))})")


if __name__ == "__main__":
    main()
