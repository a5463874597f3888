"""MP4 video and encoded-image I/O with PyAV: what LeRobot datasets store their cameras in.

`encode_video` writes frames as LeRobot does (default AV1 with SVT-AV1,
`yuv420p`, a keyframe every 2 frames, crf 30), with exact presentation
timestamps `i / fps`. `VideoFrameReader` decodes the frames nearest to
query timestamps, seeking to the keyframe before them (LeRobot's PyAV
decoding); it keeps its files open and continues decoding forwards when the
next query lies just ahead, so reading in order costs one decode per frame.
`decode_image` / `encode_png` handle the PNG / JPEG bytes of LeRobot `image`
features.
"""

import fractions
import threading

import av
import numpy as np

# LeRobot's `VideoEncoderConfig` defaults (libsvtav1 preset 12).
DEFAULT_CODEC = "libsvtav1"
DEFAULT_CODEC_OPTIONS = {"g": "2", "crf": "30", "preset": "12"}
PIX_FMT = "yuv420p"
# LeRobot's default `tolerance_s`: a frame must lie this close to its query timestamp.
DEFAULT_TOLERANCE_S = 1e-4
# Continue decoding forwards (rather than seeking) when the query is at most this far ahead.
_FORWARD_WINDOW_S = 1.0


def codec_options(codec):
    """LeRobot's default options of `codec` (GOP 2; crf 30 for the encoders that take it)."""
    if codec == "libsvtav1":
        return dict(DEFAULT_CODEC_OPTIONS)
    if codec in ("h264", "libx264", "hevc", "libx265"):
        return {"g": "2", "crf": "30", "preset": "fast"}
    return {"g": "2"}


def encode_video(frames, path, fps, codec=DEFAULT_CODEC, options=None):
    """Writes `frames` as an MP4 file whose frame i is shown at `i / fps` seconds.

    Args:
        frames: (T, H, W, 3) uint8 RGB (H and W even for `yuv420p`).
        path: the `.mp4` file to write.
        fps: frames per second.
        codec: a PyAV encoder name (`libsvtav1`, `h264`, `hevc`, `mpeg4`, ...).
        options: encoder options; default `codec_options(codec)`.

    Returns:
        LeRobot's `info` of the video feature (`video.height`, `video.codec`, ...).

    Example:
    >>> frames = np.zeros((4, 32, 32, 3), np.uint8)
    >>> encode_video(frames, "/tmp/example.mp4", fps=10)["video.codec"]
    'av1'
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"encode_video needs (T, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}."
        )
    if len(frames) == 0:
        raise ValueError("encode_video needs at least one frame, got 0.")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{PIX_FMT} video needs an even height and width, got {height}x{width}.")
    options = codec_options(codec) if options is None else options
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(fps), options=dict(options))
        stream.pix_fmt = PIX_FMT
        stream.width, stream.height = width, height
        stream.time_base = fractions.Fraction(1, int(fps))
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        codec_name = stream.codec_context.codec.canonical_name
    return {
        "video.height": int(height),
        "video.width": int(width),
        "video.codec": codec_name,
        "video.pix_fmt": PIX_FMT,
        "video.is_depth_map": False,
        "video.fps": int(fps),
        "video.channels": 3,
        "has_audio": False,
    }


class _OpenVideo:
    """One open file: its stream, the running decoder and the last decoded frame."""

    def __init__(self, path):
        try:
            self.container = av.open(str(path))
        except av.error.FFmpegError as error:
            if isinstance(error, FileNotFoundError):
                raise FileNotFoundError(f"{path}: no such video file.") from None
            raise ValueError(f"{path}: cannot open the video: {error}") from None
        if not self.container.streams.video:
            self.container.close()
            raise ValueError(f"{path}: the file holds no video stream.")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.frames = None  # the running decode generator
        self.last = None  # (timestamp, frame) last decoded

    def close(self):
        self.container.close()

    def _timestamp(self, frame):
        return float(frame.pts * self.stream.time_base)

    def _seek(self, timestamp):
        offset = max(0, round(timestamp / self.stream.time_base) - 1)
        self.container.seek(offset, backward=True, any_frame=False, stream=self.stream)
        self.frames = self.container.decode(self.stream)
        self.last = None

    def frame_at(self, timestamp, tolerance_s, path):
        """The (H, W, 3) uint8 frame within `tolerance_s` of `timestamp`."""
        ahead = self.last is not None and self.last[0] - tolerance_s <= timestamp
        if not (ahead and timestamp - self.last[0] <= _FORWARD_WINDOW_S):
            self._seek(timestamp)
        best = None
        if self.last is not None and abs(self.last[0] - timestamp) <= tolerance_s:
            best = self.last
        while best is None:
            frame = next(self.frames, None)
            if frame is None:
                break
            if frame.pts is None:
                continue
            self.last = (self._timestamp(frame), frame)
            if abs(self.last[0] - timestamp) <= tolerance_s:
                best = self.last
            elif self.last[0] > timestamp + tolerance_s:
                break
        if best is None:
            seen = "nothing" if self.last is None else f"a frame at {self.last[0]:.6f} s"
            self.frames, self.last = None, None
            raise ValueError(
                f"{path}: no frame within {tolerance_s} s of timestamp {timestamp:.6f} s "
                f"(decoding found {seen}); the video and the dataset's timestamps disagree."
            )
        return best[1].to_ndarray(format="rgb24")


class VideoFrameReader:
    """Decodes frames of MP4 files by timestamp, keeping recent files open.

    Each thread has its own open files (PyAV containers are not thread safe);
    the reader itself can be shared by threads and pickled (open files are
    not carried over).

    Args:
        tolerance_s: how far a decoded frame may lie from the query timestamp.
        max_open: open files kept per thread (least recently used closed first).

    Example:
    >>> encode_video(np.full((3, 16, 16, 3), 128, np.uint8), "/tmp/gray.mp4", fps=10)["video.fps"]
    10
    >>> VideoFrameReader().read("/tmp/gray.mp4", [0.1, 0.2]).shape
    (2, 16, 16, 3)
    """

    def __init__(self, tolerance_s=DEFAULT_TOLERANCE_S, max_open=16):
        self.tolerance_s = tolerance_s
        self.max_open = max_open
        self._local = threading.local()

    def __getstate__(self):
        return {"tolerance_s": self.tolerance_s, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(**state)

    def _open(self, path):
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
        key = str(path)
        if key in files:
            files[key] = files.pop(key)  # most recently used last
            return files[key]
        while len(files) >= self.max_open:
            files.pop(next(iter(files))).close()
        files[key] = _OpenVideo(path)
        return files[key]

    def read(self, path, timestamps):
        """(len(timestamps), H, W, 3) uint8 frames nearest to `timestamps` (seconds)."""
        video = self._open(path)
        try:
            return np.stack([video.frame_at(float(t), self.tolerance_s, path) for t in timestamps])
        except av.error.FFmpegError as error:
            self._local.files.pop(str(path)).close()
            raise ValueError(f"{path}: cannot decode the video: {error}") from None


# === Encoded images (LeRobot `image` features) ===

_DECODERS = {b"\x89PNG": "png", b"\xff\xd8\xff": "mjpeg"}


def decode_image(data, name="image"):
    """(H, W, 3) uint8 RGB of PNG or JPEG bytes."""
    data = bytes(data)
    codec = next((c for magic, c in _DECODERS.items() if data.startswith(magic)), None)
    if codec is None:
        raise ValueError(f"{name!r}: expected PNG or JPEG bytes, got {data[:8]!r}...")
    context = av.CodecContext.create(codec, "r")
    try:
        frames = context.decode(av.Packet(data)) + context.decode(None)
    except av.error.FFmpegError as error:
        raise ValueError(f"{name!r}: cannot decode the {codec} image: {error}") from None
    if not frames:
        raise ValueError(f"{name!r}: the {codec} bytes hold no image.")
    return frames[0].to_ndarray(format="rgb24")


def encode_png(image):
    """PNG bytes of one (H, W, 3) uint8 image (lossless)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"encode_png needs one (H, W, 3) uint8 image, got shape {image.shape}.")
    context = av.CodecContext.create("png", "w")
    context.width, context.height = image.shape[1], image.shape[0]
    context.pix_fmt = "rgb24"
    packets = context.encode(av.VideoFrame.from_ndarray(image, format="rgb24"))
    packets += context.encode(None)
    return b"".join(bytes(packet) for packet in packets)
