"""A sending modality in its own process (so a test can kill it mid-association): stores the
given DICOM files over one association and prints `stored NAME` for each one acknowledged.

    python tests/dicom_sender.py PORT AE_TITLE CALLED_AE FILE...
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.dicom_fixtures import modality


def main(port: int, ae_title: str, called: str, files: list[str]) -> int:
    """Send `files`; 0 when every one was acknowledged with success."""
    assoc = modality(ae_title).associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        print("refused", flush=True)
        return 2
    failed = 0
    for name in files:
        status = assoc.send_c_store(dcmread(name))
        if status and status.Status == 0x0000:
            print(f"stored {Path(name).name}", flush=True)
        else:
            failed += 1
            print(f"failed {Path(name).name}", flush=True)
    assoc.release()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]))
