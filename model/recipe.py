"""A training recipe: everything that decides a run, recorded in the model card."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass

from model.architectures import DEFAULT_INPUT_SIZE
from model.card import ModelCard


@dataclass
class TrainConfig:
    """Everything that decides a training run; recorded in the card. The defaults are the
    shipped model's recipe (data and the pretrained file's path aside)."""

    #: One architecture, or several joined by "+" (one member of each per fold, averaged).
    arch: str = "mobilenet"
    epochs: int = 10
    folds: int = 5
    seed: int = 1337
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    target_sensitivity: float = 0.95
    input_size: tuple[int, int] | None = None
    #: Images are decoded this much larger than the input, so random crops keep detail.
    load_scale: float = 1.125
    source_balanced: bool = True
    #: "heavy" erases acquisition cues (colour casts, blur, JPEG, vignettes, hairs); "mild" is
    #: v1's (geometry, brightness and contrast only; the lesion's colours are kept).
    augmentation: str = "heavy"
    #: Train only the first `members` folds' members (0: one per fold); calibration and the
    #: figures then use those folds' held-out images only.
    members: int = 1
    #: Put the early batch's first chunk of ids (`model.data.FIRST_CHUNK_IDS`) in fold 0 whole.
    hold_out_chunk: bool = False
    #: Ship only the first `ship_folds` folds' members (0: every member trained). The others
    #: are trained only for their held-out predictions: the temperature, the threshold and the
    #: card's figures use every trained fold's, so they rest on more images than one fold holds.
    ship_folds: int = 0
    #: Datasets (`labels.csv`'s `dataset`) put in fold 0 whole, beside fold 0's share of the
    #: others: fold 0's member then meets them as a new clinic's images.
    hold_out_datasets: tuple[str, ...] = ("ISIC2018-test",)
    #: ImageNet weights for a `mobilenet` or `efficientnet-lite0` member (`model.pretrained`):
    #: the pinned package's distribution or its weights file. None: random initialisation.
    pretrained: str | None = None
    #: Epochs of linear learning-rate warm-up before the cosine decay.
    warmup_epochs: int = 1
    #: A trained model (.keras, card beside it) whose first network starts the member instead of
    #: `pretrained`: a second cosine cycle on the same folds. Its card must hold out exactly this
    #: run's fold 0, so that no image it trained on is ever counted as held out here.
    init_from: str | None = None
    #: Count a `melanoma-suspected` folder (a `refer` verdict without a diagnosis, from
    #: `melanoscreen export`) as melanoma; otherwise it is skipped like any unknown folder.
    suspected_as_melanoma: bool = False
    #: Ship each fold's members (one architecture, one start) averaged weight by weight into one
    #: network of one member's cost (`model.ensemble.soup`), instead of their averaged outputs.
    soup: bool = False
    #: Trained models (.keras, card beside each) whose probabilities on each training image, the
    #: image also seen mirrored, are averaged and mixed into the targets (knowledge
    #: distillation): the member learns what those models together, with test-time flips, know
    #: at one forward pass's cost. Each card must hold out exactly this run's fold 0.
    distill_from: tuple[str, ...] = ()
    #: The teachers' share of the targets (the labels keep the rest).
    distill_weight: float = 0.5
    #: The teachers score each batch as the student sees it, augmented ("consistent teaching"),
    #: instead of once, before training, on the plain image and its mirror image: the targets
    #: then follow every crop, colour cast and blur, at one teacher's forward pass per batch
    #: and teacher.
    distill_consistent: bool = False
    #: MobileNet's stem and its first N depthwise-separable blocks keep their ImageNet weights
    #: (`model.architectures.freeze_leading_blocks`); 0 fine-tunes the whole network.
    freeze_blocks: int = 0

    @classmethod
    def from_card(cls, card: ModelCard) -> TrainConfig:
        """The recipe a card's `training` block records (its figures and paths aside)."""
        known = {name: value for name, value in card.training.items()
                 if name in cls.__dataclass_fields__
                 and name not in ("pretrained", "init_from", "distill_from")}
        for name in ("input_size", "hold_out_datasets"):
            if isinstance(known.get(name), list):
                known[name] = tuple(known[name])
        return cls(**known)

    @property
    def architectures(self) -> list[str]:
        """The architectures `arch` names, in order."""
        return self.arch.split("+")

    @property
    def size(self) -> tuple[int, int]:
        """Input (height, width): `input_size`, else the first architecture's default."""
        return self.input_size or DEFAULT_INPUT_SIZE[self.architectures[0]]

    def version(self, members: int, fingerprint: str, day: dt.date) -> str:
        """The trained model's version: what it is, when, on which data, and a digest of every
        setting, so that two runs that differ in any setting never share a version (predictions
        are stored once per image and version)."""
        settings = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.arch}-x{members}-{day:%Y%m%d}-{fingerprint[:8]}-s{self.seed}-c{settings[:6]}"
