"""DICOM objects made in the test with pydicom: synthetic pictures as VL Photographic, VL
Microscopic or Secondary Capture images, in each transfer syntax this install encodes or wraps,
and the objects that must be refused (reports, waveforms, multi-frame, pixel bombs)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

PATIENT_NAME = "Doe^Jane^Quentin"
PATIENT_ID = "PAT-4711-XYZ"
BIRTH_DATE = "19610203"

#: SOP classes by the short names the tests use.
SOP_CLASSES = {
    "photographic": uid.VLPhotographicImageStorage,
    "microscopic": uid.VLMicroscopicImageStorage,
    "secondary": uid.SecondaryCaptureImageStorage,
}


def synthetic_pixels(seed: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """uint8, shape (height, width, 3): smooth colour blobs with noise, distinct per seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 20, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


#: How each compressed transfer syntax is made here: pydicom's encoder plugin, and for a lossy
#: syntax its loss (JPEG-LS near-lossless: at most 2 per sample; JPEG 2000: 10:1).
ENCODING: dict[uid.UID, dict[str, Any]] = {
    uid.RLELossless: {"encoding_plugin": ""},
    uid.JPEGLSLossless: {"encoding_plugin": "pyjpegls"},
    uid.JPEGLSNearLossless: {"encoding_plugin": "pyjpegls", "jls_error": 2},
    uid.JPEG2000Lossless: {"encoding_plugin": "pylibjpeg"},
    uid.JPEG2000: {"encoding_plugin": "pylibjpeg", "j2k_cr": [10]},
}


def dicom_dataset(seed: int, *, kind: str = "photographic", size: tuple[int, int] = (64, 64),
                  grey: bool = False, syntax: uid.UID = uid.ExplicitVRLittleEndian,
                  patient_id: str = PATIENT_ID, patient_name: str = PATIENT_NAME,
                  study_uid: str | None = None, accession: str = "ACC0001",
                  **extra: Any) -> Dataset:
    """A single-frame image object holding `synthetic_pixels(seed)`, in `syntax`."""
    pixels = synthetic_pixels(seed, size)
    if grey:
        pixels = pixels.mean(axis=2).astype(np.uint8)
    ds = _base(SOP_CLASSES[kind], syntax, patient_id=patient_id, patient_name=patient_name,
               study_uid=study_uid, accession=accession)
    ds.Rows, ds.Columns = pixels.shape[0], pixels.shape[1]
    ds.SamplesPerPixel = 1 if grey else 3
    ds.PhotometricInterpretation = "MONOCHROME2" if grey else "RGB"
    if not grey:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if syntax == uid.JPEGBaseline8Bit:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=92)
        ds.PixelData = encapsulate([out.getvalue()])
        if not grey:
            ds.PhotometricInterpretation = "YBR_FULL_422"
    elif syntax in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                    uid.DeflatedExplicitVRLittleEndian):
        ds.PixelData = pixels.tobytes()  # deflated: pydicom deflates the whole dataset on write
    else:  # RLE, JPEG-LS, JPEG 2000: pydicom's encoders (RLE its own, JPEG-LS through
        # pyjpegls, JPEG 2000 through pylibjpeg), lossy ones at a bounded loss
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        ds.PixelData = pixels.tobytes()
        ds.compress(syntax, **ENCODING[syntax])
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _base(sop_class: uid.UID, syntax: uid.UID, *, patient_id: str, patient_name: str,
          study_uid: str | None, accession: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = BIRTH_DATE
    ds.StudyInstanceUID = study_uid or uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.AccessionNumber = accession
    ds.Modality = "XC"
    ds.BodyPartExamined = "ARM"
    ds.ImageLaterality = "L"
    ds.AcquisitionDateTime = "20261204101530"
    region = Dataset()
    region.CodeValue = "T-D8200"
    region.CodingSchemeDesignator = "SRT"
    region.CodeMeaning = "Arm"
    ds.AnatomicRegionSequence = Sequence([region])
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, `DICM`, file meta)."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def report_bytes() -> bytes:
    """A Basic Text SR: a DICOM object with no pixel data."""
    ds = _base(uid.BasicTextSRStorage, uid.ExplicitVRLittleEndian, patient_id=PATIENT_ID,
               patient_name=PATIENT_NAME, study_uid=None, accession="ACC-SR")
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    return dicom_bytes(ds)


def waveform_bytes() -> bytes:
    """A 12-lead ECG object: waveform data, no pixels."""
    ds = _base(uid.TwelveLeadECGWaveformStorage, uid.ExplicitVRLittleEndian,
               patient_id=PATIENT_ID, patient_name=PATIENT_NAME, study_uid=None, accession="ECG")
    ds.Modality = "ECG"
    item = Dataset()
    item.NumberOfWaveformChannels = 1
    item.NumberOfWaveformSamples = 4
    item.WaveformBitsAllocated = 16
    item.WaveformSampleInterpretation = "SS"
    item.WaveformData = np.arange(4, dtype=np.int16).tobytes()
    ds.WaveformSequence = Sequence([item])
    return dicom_bytes(ds)


def multiframe_bytes(frames: int = 3) -> bytes:
    """A Secondary Capture object of `frames` frames."""
    ds = dicom_dataset(1, kind="secondary")
    stack = np.stack([synthetic_pixels(seed) for seed in range(frames)])
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    return dicom_bytes(ds)


def bomb_dataset(seed: int = 99) -> Dataset:
    """An image whose header claims 60000 × 60000 pixels over a few bytes of pixel data."""
    ds = dicom_dataset(seed)
    ds.Rows = ds.Columns = 60000
    return ds


def malformed_bytes(seed: int = 98) -> bytes:
    """A DICOM file whose pixel data stops halfway."""
    ds = dicom_dataset(seed)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return dicom_bytes(ds)


#: Transfer syntaxes a sending modality offers, one presentation context each per SOP class.
OFFERED_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.JPEGBaseline8Bit,
                    uid.RLELossless, uid.JPEG2000Lossless, uid.JPEGLSLossless,
                    uid.JPEGLSNearLossless, uid.JPEG2000)


def modality(ae_title: str = "MODALITY1") -> Any:
    """A pynetdicom AE that sends the image SOP classes (each syntax its own context) and C-ECHO."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    for sop_class in SOP_CLASSES.values():
        for syntax in OFFERED_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae
