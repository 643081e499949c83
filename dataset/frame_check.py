"""What is wrong with one JPEG frame, if anything: the check create_lmdb.py runs on every frame it packs,
and the clip datasets on the frames of a clip that failed."""

import io

from PIL import Image


def frame_problem(data: bytes, full: bool = False) -> str | None:
    """None if `data` decodes as an image, else what is wrong (`is empty (0 bytes)`, `cannot be decoded: ...`).

    By default libjpeg decodes at 1/8 scale (draft mode), which still reads every byte of the
    compressed data, so a damaged stream is found at a fraction of a full decode's cost.
    """
    if not data:
        return "is empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if not full:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as err:  # noqa: BLE001  whatever PIL raises, the frame is what is wrong
        reason = "not an image file PIL can identify" if isinstance(err, Image.UnidentifiedImageError) else str(err)
        return f"cannot be decoded ({reason})"
    return None
