"""What an upload may be and what decoding it may cost: the accepted containers, and the size,
length, time and memory limits (per deployment through `DecodeLimits`: `service.settings`). Every
decoder (avdecode in the decode workers, the ffmpeg path of `media`, the probe) reads them here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Limits (the service config may override them per deployment through DecodeLimits).
PROBE_TIMEOUT_S = 10.0  # seconds for ffprobe on one upload
DECODE_TIMEOUT_S = 60.0  # seconds for one whole decode (probe included) of audio + frames
MAX_DURATION_S = 600.0  # longer uploads are refused before decoding (and decoding is capped at it)
MAX_SIDE = 480  # decoded frames are scaled inside ffmpeg so their longer side is at most this
OVERRUN_MARGIN_S = 1.0  # decoding reads this far past max_duration_s to detect overlong clips
DECODE_THREADS = 2  # decoder threads per ffmpeg process; many requests decode at once
MAX_INPUT_PIXELS = 7680 * 4320  # larger declared frames (8K UHD) are refused before decoding
# Sanity bounds on declared metadata: outside them a value is ignored (duration, rotation) or the
# stream is not used as video (size). 65535 px is what most containers can even store.
MAX_SIDE_DECLARED = 65535
MAX_DURATION_DECLARED_S = 1e7
# Per ffmpeg/ffprobe process, set in the child before exec. The wall-clock timeout is the main
# limit; the CPU limit (timeout x CPU_PER_WALL_S, ffmpeg has several threads) is the backstop if
# the parent could not kill it. The address-space limit bounds what a hostile file can make it
# allocate: a 1080p decode maps about 0.5 GB (mostly shared libraries and thread stacks).
CPU_PER_WALL_S = DECODE_THREADS + 1
FFMPEG_MAX_MEMORY = 2 << 30  # bytes of virtual address space (RLIMIT_AS)

# Demuxers allowed to open an upload: ordinary single-file audio/video containers. Deliberately
# absent: hls/applehttp, dash, concat, image2 and *_pipe image demuxers, lavfi, tee, sdp, rtp,
# data, subtitles and every other demuxer that follows references or is not audio/video.
ALLOWED_DEMUXERS: tuple[str, ...] = (
    "mov",  # mov,mp4,m4a,3gp,3g2,mj2
    "matroska",  # matroska,webm
    "avi",
    "mpegts",
    "mpeg",  # MPEG-PS (.mpg, .vob)
    "flv",
    "asf",  # .wmv, .wma
    "ogg",
    "wav",
    "w64",
    "aiff",
    "flac",
    "mp3",
    "aac",  # ADTS
    "amr",
    "caf",
    "au",
)
ALLOWED_PROTOCOLS = "file,pipe"


@dataclass(frozen=True)
class DecodeLimits:
    timeout_s: float = DECODE_TIMEOUT_S
    max_duration_s: float = MAX_DURATION_S
    max_side: int = MAX_SIDE
    threads: int = DECODE_THREADS  # decoder threads per decode (the service: cpu.thread_plan)


DEFAULT_LIMITS = DecodeLimits()
