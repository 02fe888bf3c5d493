"""Which encoded images decode: under PIL and, when DALI is installed, under DALI's own CPU decoder.

DALI stops its whole pipeline on an image it cannot decode, and it is stricter than PIL: it rejects
a JPEG that ends early (PIL too) and one with a damaged header or stray markers (PIL decodes those).
Shards whose every image passed both can be streamed by DALI; see ``checked_with`` in the manifest.

DALI 2.4's CPU decoder can also crash the process (SIGSEGV, measured: 2 of 6 runs with one damaged
header in a batch of 32, none in 6 runs of batches of 16 or less), so a JPEG reaches it only after its
marker structure has been walked here (:func:`jpeg_structure_error`), and in batches of 16.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

CHUNK = 16  # images per DALI decode call (see the module docstring)


def decoders() -> list[str]:
    """The decoders :func:`decode_errors` checks with here: ``pil``, and ``dali`` when DALI's dynamic mode imports."""
    from moco_scale.data.dali import dali_available

    if not dali_available():
        return ["pil"]
    try:
        import nvidia.dali.experimental.dynamic  # noqa: F401
    except ImportError:
        return ["pil"]
    return ["pil", "dali"]


def pil_error(payload: bytes) -> str | None:
    """Why PIL cannot fully decode ``payload``, or None when it can."""
    if not payload:
        return "empty file"
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
    except UnidentifiedImageError:
        return "not an image format PIL can identify"
    except Exception as e:  # anything a broken file makes the decoder raise
        return f"{type(e).__name__}: {e}"
    return None


def _table_error(marker: int, body: bytes) -> str | None:
    """Why a DHT/DQT/SOF/SOS segment body is inconsistent with its own length, or None."""
    if marker == 0xC4:  # Huffman tables: class/id, 16 code counts, then that many symbols; repeated
        pos = 0
        while pos < len(body):
            counts = body[pos + 1 : pos + 17]
            if len(counts) < 16 or body[pos] >> 4 > 1 or body[pos] & 15 > 3:
                return "a damaged Huffman table"
            pos += 17 + sum(counts)
        return None if pos == len(body) and body else "a damaged Huffman table"
    if marker == 0xDB:  # quantisation tables: precision/id, then 64 bytes or 64 words; repeated
        pos = 0
        while pos < len(body):
            if body[pos] & 15 > 3 or body[pos] >> 4 > 1:
                return "a damaged quantisation table"
            pos += 1 + 64 * (1 + (body[pos] >> 4))
        return None if pos == len(body) and body else "a damaged quantisation table"
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # frame header
        ok = len(body) >= 6 and 1 <= body[5] <= 4 and len(body) == 6 + 3 * body[5] and body[1:5].count(0) < 4
        return None if ok else "a damaged frame header"
    if marker == 0xDA:  # scan header
        return None if body and 1 <= body[0] <= 4 and len(body) == 4 + 2 * body[0] else "a damaged scan header"
    return None


def jpeg_structure_error(data: bytes) -> str | None:
    """Why a JPEG's marker structure is broken, or None when it is whole (and for other formats).

    Walks SOI, every segment (lengths, and the tables' own sizes), the entropy-coded data of every
    scan (``FF`` may only be followed by ``00``, a restart marker or a next segment), up to EOI.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, scans = 2, 0
    while True:
        if pos + 2 > len(data):
            return "ends before its end marker"
        if data[pos] != 0xFF:
            return f"no marker at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return None if scans else "no image data before its end marker"
        if marker == 0x00 or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            return f"a stray marker FF{marker:02X} at byte {pos}"
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            return f"a segment at byte {pos} runs past the end"
        if error := _table_error(marker, data[pos + 4 : pos + 2 + length]):
            return error
        pos += 2 + length
        if marker != 0xDA:
            continue
        scans += 1
        while True:  # entropy-coded data: up to the next FF that is not stuffing or a restart marker
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= len(data):
                return "ends inside its image data"
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                pos += 2
            elif following == 0xFF:
                pos += 1
            else:
                break


def _dali_decodes(payloads: Sequence[bytes]) -> bool:
    import nvidia.dali.experimental.dynamic as ndd
    from nvidia.dali import types

    ndd.set_num_threads(
        1
    )  # its default is a thread per core in every process; the writer's processes are the parallelism
    try:
        batch = ndd.decoders.image(
            ndd.batch([np.frombuffer(p, dtype=np.uint8) for p in payloads]), device="cpu", output_type=types.RGB
        )
        batch.evaluate()
    except RuntimeError:
        return False
    return True


def _dali_failures(payloads: Sequence[bytes], offset: int = 0) -> list[int]:
    """Indices (plus ``offset``) of the payloads DALI's decoder rejects: one call for the lot, halves on failure."""
    if _dali_decodes(payloads):
        return []
    if len(payloads) == 1:
        return [offset]
    half = len(payloads) // 2
    return _dali_failures(payloads[:half], offset) + _dali_failures(payloads[half:], offset + half)


def decode_errors(payloads: Sequence[bytes], with_decoders: Sequence[str] | None = None) -> list[str | None]:
    """For each payload, why it does not decode under every one of ``with_decoders`` (default
    :func:`decoders`), or None when it does."""
    with_decoders = decoders() if with_decoders is None else with_decoders
    errors = [pil_error(p) if "pil" in with_decoders else None for p in payloads]
    if "dali" in with_decoders:
        for i, payload in enumerate(payloads):
            if errors[i] is None and (broken := jpeg_structure_error(payload)):
                errors[i] = f"broken JPEG: {broken}"
        passed = [i for i, e in enumerate(errors) if e is None]
        for start in range(0, len(passed), CHUNK):
            chunk = passed[start : start + CHUNK]
            for j in _dali_failures([payloads[i] for i in chunk]):
                errors[chunk[j]] = "DALI's decoder rejects it"
    return errors
