"""Why a file was not screened, in words a clinic's staff read without knowing the image library.
Pure: a recorded reason in, a sentence out. The recorded reason itself stays as it was (the JSON
of `results` and the API give it whole, for whoever debugs)."""

from __future__ import annotations

#: (how a recorded reason starts, what it means in plain words), first match wins.
_PLAIN = (
    ("empty file", "the file is empty (0 bytes): was it copied in full?"),
    ("cannot read file", "the file could not be read from the disk"),
    ("not an image Pillow can read", "not an image file, or a kind of image this service cannot read"),
    ("corrupt or truncated image", "the image file is damaged or incomplete: was it copied in full?"),
    ("too many pixels", "the image is too large to screen safely (too many pixels)"),
    ("unreadable image", "the image file is damaged and cannot be read"),
    ("DICOM object without pixel data", "a DICOM object with no picture in it (a report, a "
     "waveform or a note): nothing to screen"),
    ("multi-frame DICOM", "a DICOM object with several frames (a video or a stack): send each "
     "view as its own image"),
    ("not a readable DICOM", "the DICOM file is damaged and cannot be read"),
    ("malformed DICOM", "the DICOM file is damaged and cannot be read"),
    ("DICOM pixel data cannot be decoded", "the DICOM picture is compressed in a way this "
     "service cannot read, or is damaged"),
    ("DICOM", "a DICOM object this service cannot screen"),
)


def plain_reason(reason: str) -> str:
    """The recorded `reason` in plain words; one this module does not know, unchanged."""
    for start, words in _PLAIN:
        if reason.startswith(start):
            return words
    return reason
