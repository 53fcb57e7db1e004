"""Hostile and malformed uploads, generated on demand, for the hardening tests and `foalnet soak`.

Everything is made here with ffmpeg from lavfi sources or by editing bytes, nothing is checked in,
so `foalnet soak` sends the same corpus as `tests/test_hostile.py`. Each `Case` says which answers
are acceptable: `OK` (200, the input is valid media) and/or error codes. A `Listener` is a local TCP port that records whether anything
connected: playlists in the corpus point at it, and it must never be contacted.

    cases = build_corpus(folder, base=plain_clip(folder / "base.mp4"), listener_url=listener.url)
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.media import ffmpeg, make_clip, set_rotation
from service.errors import ErrorCode

if TYPE_CHECKING:
    from typing import Self

OK = "ok"  # the answer a valid clip gets: 200 with a prediction
LOCAL_SECRET = "/etc/passwd"  # what playlists try to read; its first line must never come back
LOCAL_SECRET_MARK = "root:x:0:0"
LONG_CLIP_S = 3600.0  # "far longer than the duration cap" (600 s by default)
MANY_STREAMS = 300
HUGE_SIDE = 16000  # declared frame side of the doctored AVI (valid for libavutil, over our cap)


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    filename: bytes  # the multipart file name sent with it (some are deliberately odd)
    expect: tuple[str, ...]  # acceptable outcomes: OK and/or ErrorCode values

    @property
    def valid(self) -> bool:
        return OK in self.expect


def plain_clip(path: Path) -> Path:
    """A valid 2 s h264/aac mp4 without a face (the answer comes from the audio): the corpus' base."""
    return make_clip(path, seconds=2.0, width=160, height=120, fps=15, video="noface", audio="tone")


# --- byte surgery -----------------------------------------------------------------------------


def _mp4_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """Top-level (type, start, end) boxes of an mp4."""
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            break
        boxes.append((kind, pos, min(pos + size, len(data))))
        pos += size
    return boxes


def without_moov(data: bytes) -> bytes:
    """The mp4 with its index (moov box) removed: the media data is there, nothing says where."""
    moov = [(a, b) for kind, a, b in _mp4_boxes(data) if kind == b"moov"]
    if not moov:
        raise ValueError("no moov box")
    a, b = moov[0]
    return data[:a] + data[b:]


def flipped_mdat(data: bytes, every: int = 211) -> bytes:
    """The mp4 with bits flipped in every `every`-th byte of its media data (damaged h264/aac)."""
    mdat = [(a, b) for kind, a, b in _mp4_boxes(data) if kind == b"mdat"]
    if not mdat:
        raise ValueError("no mdat box")
    a, b = mdat[0]
    out = bytearray(data)
    for i in range(a + 64, b, every):
        out[i] ^= 0x5A
    return bytes(out)


def huge_avi(path: Path, side: int = HUGE_SIDE) -> Path:
    """A tiny rawvideo AVI whose headers declare `side` x `side` frames."""
    ffmpeg("-f", "lavfi", "-i", "color=s=16x16:d=0.4:r=5", "-c:v", "rawvideo", "-pix_fmt", "gray", str(path))
    data = bytearray(path.read_bytes())
    avih = data.index(b"avih") + 8
    struct.pack_into("<II", data, avih + 32, side, side)  # dwWidth, dwHeight
    strf = data.index(b"strf") + 8
    struct.pack_into("<ii", data, strf + 4, side, side)  # BITMAPINFOHEADER biWidth, biHeight
    path.write_bytes(bytes(data))
    return path


# --- the corpus -------------------------------------------------------------------------------


def build_corpus(folder: Path, base: Path, *, listener_url: str) -> list[Case]:
    """Write the corpus into `folder`; `base` is a valid mp4 with audio and video (moov at the
    end, as ffmpeg writes it). Playlists point at LOCAL_SECRET and at `listener_url`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = base.read_bytes()
    cases: list[Case] = []

    def add(name: str, content: bytes | Path, expect: tuple[str, ...], filename: bytes | None = None) -> None:
        path = content if isinstance(content, Path) else folder / name
        if not isinstance(content, Path):
            path.write_bytes(content)
        cases.append(Case(name, path, filename if filename is not None else name.encode(), expect))

    code = ErrorCode
    add("empty.mp4", b"", (code.EMPTY_UPLOAD.value,))
    add("random.mp4", random.Random(0).randbytes(64 * 1024), (code.NOT_MEDIA.value,))
    add("half.mp4", data[: len(data) // 2], (code.CORRUPT_MEDIA.value,))
    add("no-moov.mp4", without_moov(data), (code.CORRUPT_MEDIA.value, code.NOT_MEDIA.value))
    add("flipped-mdat.mp4", flipped_mdat(data), (OK, code.CORRUPT_MEDIA.value))
    hls = (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n"
        f"#EXTINF:1,\n{LOCAL_SECRET}\n#EXTINF:1,\n{listener_url}/segment.ts\n#EXT-X-ENDLIST\n"
    )
    add("hls.mp4", hls.encode(), (code.NOT_MEDIA.value,))
    concat = f"ffconcat version 1.0\nfile {LOCAL_SECRET}\nfile {listener_url}/clip.mp4\n"
    add("ffconcat.mp4", concat.encode(), (code.NOT_MEDIA.value,))
    for ext in ("png", "jpg"):
        ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x48", "-frames:v", "1", str(folder / f"image.{ext}"))
        add(f"image.{ext}", folder / f"image.{ext}", (code.NOT_MEDIA.value,))
    ffmpeg("-i", str(base), "-vn", "-c:a", "copy", str(folder / "audio-only.m4a"))
    add("audio-only.m4a", folder / "audio-only.m4a", (OK,))
    add("huge.avi", huge_avi(folder / "huge.avi"), (code.TOO_LARGE.value,))
    add("huge-invalid.avi", huge_avi(folder / "huge-invalid.avi", 30000), (code.NO_USABLE_STREAM.value,))
    ffmpeg(
        *("-f", "lavfi", "-i", f"color=s=32x32:r=1:d={LONG_CLIP_S}"),
        *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(folder / "hour.mp4")),
    )
    add("hour.mp4", folder / "hour.mp4", (code.TOO_LONG.value,))
    maps = [arg for _ in range(MANY_STREAMS) for arg in ("-map", "0:a")]
    ffmpeg(
        *("-f", "lavfi", "-i", "sine=frequency=300:sample_rate=8000:duration=1"),
        *maps,
        *("-c:a", "pcm_s16le", str(folder / "streams.mkv")),
    )
    add("streams.mkv", folder / "streams.mkv", (OK,))
    ffmpeg(
        *("-i", str(base), "-vf", "select='lt(mod(n\\,10)\\,3)+eq(n\\,17)'", "-fps_mode", "vfr"),
        *("-c:v", "libx264", "-preset", "ultrafast", "-c:a", "copy", str(folder / "vfr.mkv")),
    )
    add("vfr.mkv", folder / "vfr.mkv", (OK,))
    add("rotated.mp4", set_rotation(base, folder / "rotated.mp4", 90), (OK,))
    for name, filename in (
        ("name-non-utf8", b"\xff\xfeclip\x80\xc3(.mp4"),
        ("name-traversal", b"../../etc/passwd.mp4"),
        ("name-1000", b"a" * 996 + b".mp4"),
    ):
        add(name, base, (OK,), filename=filename)
    return cases


def multipart(data: bytes, filename: bytes, content_type: str = "video/mp4") -> tuple[bytes, str]:
    """A multipart/form-data body with one `file` field, the file name sent byte for byte."""
    boundary = "foalnet" + os.urandom(12).hex()
    name = filename.replace(b'"', b"%22").replace(b"\r", b"").replace(b"\n", b"")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        + name
        + f'"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
    )
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Listener:
    """A loopback TCP port that records every connection (and closes it at once)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.contacts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="listener")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.contacts += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
