"""How chunk images are stored in a bundle: compressed with zstd (the header's ``"codec"``).

A bundle whose header names no codec holds its chunk images as they are (bundles before the
codec, and ``codec=None``). Under ``"zstd"`` each chunk is one zstd frame that declares its
size, or a plain image (it starts with SQLite's magic) where compressing gained too little or
more than a reader accepts.

A reader decompresses at most the size a frame declares, and accepts a declared size of at
most MAX_RATIO times the frame's own size and at most MAX_IMAGE: whatever a bundle holds,
decompressing it costs at most MAX_RATIO times its size in work, and no chunk image more than
MAX_IMAGE of memory. The importer holds a few images at once (it checks the next chunk while it
applies one), so a bundle of such bombs peaks at a few times MAX_IMAGE (243 MB with 3, 275 MB with 8),
however many chunks it has. A writer stores larger images (a single huge value) as they are.
"""

from __future__ import annotations

import zstandard

from .errors import INVALID_OPERATION, UNSUPPORTED_FORMAT, BundleError, shorten

ZSTD = "zstd"
CODECS = (ZSTD,)
DEFAULT = ZSTD
# Measured on the todos workload (bench/bench_export.py): level 1 makes smaller bundles than
# level 3 or zlib at any level, in less time; level 6 saves a tenth more at five times the time.
LEVEL = 1
MAX_RATIO = 64
MAX_IMAGE = 32 * 1024 * 1024  # four times the values a chunk is cut at (bundle.CHUNK_BYTES)
SQLITE_MAGIC = b"SQLite format 3\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def pack(image: bytes, codec: str | None) -> bytes:
    """The stored form of a chunk image under ``codec``."""
    if codec is None:
        return image
    packed = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(image)
    if len(packed) >= len(image) or len(image) > MAX_RATIO * len(packed) or len(image) > MAX_IMAGE:
        return image  # a reader would refuse the frame (see MAX_RATIO, MAX_IMAGE), or it gains nothing
    return packed


def unpack(data: bytes, codec: str | None, bundle_name: str) -> bytes:
    """The chunk image stored as ``data``; a BundleError for anything a writer cannot have made."""
    if codec is None or data.startswith(SQLITE_MAGIC):
        return data

    def fail(why: str) -> BundleError:
        return BundleError(INVALID_OPERATION, f"Bundle {bundle_name} has a chunk that cannot be decompressed ({why})")

    if not data.startswith(ZSTD_MAGIC):
        raise fail("not a zstd frame")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as ex:
        raise fail(str(ex))
    if declared < 0:
        raise fail("the frame does not declare its size")
    if declared > MAX_RATIO * len(data):
        raise fail(f"it declares {declared} bytes from {len(data)}, more than {MAX_RATIO} times its size")
    if declared > MAX_IMAGE:
        raise fail(f"it declares {declared} bytes, more than the {MAX_IMAGE} a writer compresses")
    try:
        # zstd writes at most the declared size, and fails a frame that holds more or less.
        image = zstandard.ZstdDecompressor().decompress(data, max_output_size=declared)
    except zstandard.ZstdError as ex:
        raise fail(shorten(str(ex), 200))
    if len(image) != declared:
        raise fail("it does not hold the size it declares")
    return image


def check_codec(codec: object, bundle_name: str) -> None:
    """Refuse a header's codec this version cannot read."""
    if codec is None or codec in CODECS:
        return
    raise BundleError(
        UNSUPPORTED_FORMAT,
        f"Bundle {bundle_name} has chunks compressed with {shorten(codec)}, which this version cannot read "
        f"(it reads {', '.join(CODECS)})",
    )
