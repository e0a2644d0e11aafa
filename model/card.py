"""The model card: the JSON that travels beside every `.keras` file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CARD_SUFFIX = ".json"


@dataclass
class ModelCard:
    """What a trained model is, how to feed it, and how well it did on validation."""

    version: str
    architecture: str
    classes: list[str]
    input_size: list[int]  # [height, width]
    alert_threshold: float
    preprocessing: str = (
        "decode with EXIF orientation, composite transparency onto white, convert to 8-bit RGB, "
        "resize the whole image (no crop, bilinear) to input_size; float32 values 0..255; the "
        "model rescales internally"
    )
    test_time_flips: bool = False
    target_sensitivity: float = 0.95
    temperature: float = 1.0  # applied inside the model; recorded here to be read
    members: int = 1  # models averaged inside the saved model
    #: Images whose scope distance (the model's second output) exceeds this are out of scope;
    #: None: the model has no such output.
    out_of_scope_distance: float | None = None
    trained_at: str = ""
    training_set: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def melanoma_index(self) -> int:
        """Index of the melanoma class in the output vector."""
        return self.classes.index("melanoma")

    def write(self, path: Path) -> None:
        """Write the card as pretty JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=False) + "\n")

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """Read a card written by `write`; unknown keys are ignored."""
        data = json.loads(Path(path).read_text())
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def card_path_for(model_path: Path) -> Path:
    """`foo.keras` -> `foo.json`."""
    return Path(model_path).with_suffix(CARD_SUFFIX)


def shipped_model_path() -> Path:
    """The trained model that ships in this package."""
    return Path(__file__).resolve().parent / "shipped" / "melanoscreen-v3.keras"
