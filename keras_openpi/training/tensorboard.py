"""TensorBoard scalars without TensorFlow: a writer of TensorBoard's event files.

An event file is a TFRecord file (`length`, its masked CRC-32C, the record,
its masked CRC-32C) of `Event` protocol buffers. Only the fields scalars
need are written: `Event{wall_time=1, step=2, file_version=3, summary=5}`,
`Summary{value=1}`, `Summary.Value{tag=1, simple_value=2}`. TensorBoard
reads the files as it reads TensorFlow's. Why not `keras.callbacks.TensorBoard`:
it writes through `tf.summary`, importing TensorFlow (and needing the
`tensorboard` package) in a JAX run; see benchmarks/tensorboard_writer.py.
"""

import pathlib
import socket
import struct
import time


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    """CRC-32C (Castagnoli) of `data`.

    Example:
    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    """TFRecord's masked CRC: rotate right by 15 bits and add 0xa282ead8."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value):
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number, wire_type):
    return _varint(number << 3 | wire_type)


def _bytes_field(number, payload):
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(step, wall_time, scalars=None, file_version=None):
    """An `Event` protocol buffer with `scalars` `{tag: float}` (or the file version)."""
    event = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        event += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b""
        for tag, value in scalars.items():
            entry = _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(value))
            summary += _bytes_field(1, entry)
        event += _bytes_field(5, summary)
    return event


def tfrecord(payload):
    """One TFRecord: the payload framed with its length and masked CRCs."""
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


def read_tfrecords(path):
    """The payloads of a TFRecord file, checking every CRC (raises ValueError on corruption)."""
    data = pathlib.Path(path).read_bytes()
    records, offset = [], 0
    while offset < len(data):
        length_bytes = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        if length_crc != masked_crc32c(length_bytes) or payload_crc != masked_crc32c(payload):
            raise ValueError(f"{path}: corrupt TFRecord at byte {offset}.")
        records.append(payload)
        offset += 16 + length
    return records


class EventWriter:
    """Appends scalar summaries to a TensorBoard event file in `log_dir`.

    Args:
        log_dir: the run's directory (TensorBoard: `tensorboard --logdir <dir>`).

    Example:
    >>> writer = EventWriter("/tmp/run/tensorboard")  # doctest: +SKIP
    >>> writer.scalars(1, {"loss": 0.5, "learning_rate": 2.5e-8})  # doctest: +SKIP
    >>> writer.close()  # doctest: +SKIP
    """

    def __init__(self, log_dir):
        self.log_dir = pathlib.Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = self.log_dir / name
        self._file = open(self.path, "ab")
        self._write(encode_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        self._file.write(tfrecord(event))
        self._file.flush()

    def scalars(self, step, values):
        """Writes `{tag: float}` at `step`."""
        self._write(encode_event(step, time.time(), scalars=values))

    def close(self):
        self._file.close()
