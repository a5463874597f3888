"""`PolicyServer`: openpi's websocket policy protocol, robust to bad requests.

The protocol is `openpi.serving.websocket_policy_server`'s, so that
`openpi_client.websocket_client_policy.WebsocketClientPolicy` works unchanged:

- on connect the server sends the policy's metadata (msgpack, see
  `msgpack_codec`);
- each binary message is one observation; the reply is the policy's output
  dict plus `server_timing`: `infer_ms` (time in `policy.infer`),
  `prev_total_ms` (from the second reply on: the previous cycle, from the
  start of waiting for its request to its reply sent, as openpi measures it,
  so it includes the client's time between requests) and `queue_ms` (time
  waiting for other connections' inferences; an addition of keras_openpi);
- a request that cannot be served gets a text frame with a one-line reason
  (which the client raises as `RuntimeError("Error in inference server: ...")`)
  and the connection is closed with code 1011; the server keeps serving.
  Actions with NaN or inf, or π0-FAST tokens that decode to no action chunk,
  are never sent: an internal-error frame naming the cause replaces them;
- a message over `max_message_bytes` is refused by the websocket layer from
  its frame header, before its payload is read, with close code 1009 and the
  reason `frame with N bytes exceeds limit of M bytes`; and each connection
  buffers at most `MAX_QUEUED_MESSAGES` messages ahead of the one being served,
  so a connection holds a few messages of memory at most;
- `GET /healthz` answers 200 `OK`.

Inference runs on one worker thread, so requests from any number of
connections are served one at a time in arrival order while the event loop
keeps accepting connections, answering pings and health checks.
"""

import asyncio
import concurrent.futures
import hmac
import http
import logging
import signal
import threading
import time

import websockets
from websockets.asyncio.server import serve
from websockets.frames import CloseCode

from keras_openpi.serving import msgpack_codec
from keras_openpi.serving.policy import NoValidActions

logger = logging.getLogger("keras_openpi.serving")

# Fits four 720p float32 cameras (openpi clients send 224x224 uint8: ~150 KB each).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
# openpi's protocol has one request in flight per connection; frames a client
# sends ahead of its reply wait in a queue of at most this many (then reading pauses).
MAX_QUEUED_MESSAGES = 1
BAD_REQUEST_REASON = "Bad request. Reason included in previous frame."
INTERNAL_ERROR_REASON = "Internal server error. Reason included in previous frame."
# Exceptions of the policy that mean "this observation cannot be served".
BAD_INPUT_ERRORS = (ValueError, KeyError, TypeError)


class BadRequest(ValueError):
    """A request that is not an observation (not msgpack, not a map)."""


def check_api_key(api_key):
    """Raises a ValueError unless `api_key` is None or a key a client can send in a header.

    An empty key (`--api-key "$KEY"` with `KEY` unset) would otherwise serve
    without authentication; a key with surrounding spaces or characters an
    HTTP header cannot carry would refuse every client.
    """
    if api_key is None:
        return
    if not isinstance(api_key, str) or not api_key.strip():
        raise ValueError(
            f"the API key is empty ({api_key!r}); pass a non-empty key, or no --api-key (and no "
            "$KERAS_OPENPI_API_KEY) to serve without authentication."
        )
    if api_key != api_key.strip() or not (api_key.isascii() and api_key.isprintable()):
        raise ValueError(
            "the API key must be printable ASCII without leading or trailing spaces (clients "
            "send it in an HTTP header), got a key that is not."
        )


def _one_line(error):
    text = f"missing key {error}" if isinstance(error, KeyError) else str(error)
    return " ".join(text.split())


class PolicyServer:
    """Serves a policy over websockets with openpi's protocol.

    Args:
        policy: has `infer(obs) -> dict` and `metadata` (a `Policy`).
        host: the address to listen on (`0.0.0.0` for every interface).
        port: the TCP port; 0 picks a free one (`port` holds it once `listening`).
        api_key: when set, connections must send `Authorization: Api-Key <key>`
            (`/healthz` needs none); see `check_api_key`.
        max_message_bytes: larger requests are refused before they are read
            (close code 1009).

    Example:
    >>> server = PolicyServer(policy, port=8000)  # doctest: +SKIP
    >>> server.serve_forever()  # doctest: +SKIP
    """

    def __init__(
        self,
        policy,
        host="127.0.0.1",
        port=8000,
        api_key=None,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
    ):
        if int(max_message_bytes) < 1:
            raise ValueError(f"'max_message_bytes' must be positive, got {max_message_bytes}.")
        check_api_key(api_key)
        self.policy = policy
        self.host = host
        self.port = int(port)
        self.api_key = api_key
        self.max_message_bytes = int(max_message_bytes)
        self._metadata_message = msgpack_codec.packb(policy.metadata)
        self.listening = threading.Event()

    def serve_forever(self):
        """Serves until SIGINT or SIGTERM."""
        asyncio.run(self._serve_until_signal())

    async def _serve_until_signal(self):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.run(stop)

    async def run(self, stop):
        """Serves until `stop` (an `asyncio.Event`) is set; `listening` is set once bound."""
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
        try:
            async with serve(
                self._handle,
                self.host,
                self.port,
                compression=None,
                max_size=self.max_message_bytes,
                max_queue=MAX_QUEUED_MESSAGES,
                process_request=self._process_request,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                logger.info("listening on ws://%s:%d", self.host, self.port)
                self.listening.set()
                await stop.wait()
        finally:
            self._worker.shutdown(wait=True)
            self.listening.clear()
        logger.info("server stopped")

    # === Handshake ===

    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is None:
            return None
        headers = request.headers.get_all("Authorization")
        if len(headers) > 1:
            logger.warning("%s refused: %d Authorization headers", _peer(connection), len(headers))
            return connection.respond(
                http.HTTPStatus.BAD_REQUEST,
                f"Bad request: {len(headers)} Authorization headers; send exactly one, "
                "'Authorization: Api-Key <key>'.\n",
            )
        given = headers[0] if headers else ""
        expected = f"Api-Key {self.api_key}"
        if hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
            return None
        logger.warning(
            "%s refused: %s API key",
            _peer(connection),
            "wrong" if given else "no",
        )
        return connection.respond(
            http.HTTPStatus.UNAUTHORIZED,
            "Unauthorized: send the header 'Authorization: Api-Key <key>'.\n",
        )

    # === Connection ===

    async def _handle(self, websocket):
        peer = _peer(websocket)
        logger.info("%s connected", peer)
        served, infer_total = 0, 0.0
        try:
            await websocket.send(self._metadata_message)
            prev_total = None
            while True:
                start = time.monotonic()
                message = await websocket.recv()
                try:
                    reply, infer_ms = await self._answer(message, prev_total)
                except BAD_INPUT_ERRORS as error:
                    text = f"bad request: {_one_line(error)}"
                    logger.warning("%s %s", peer, text)
                    await _fail(websocket, text, BAD_REQUEST_REASON)
                    return
                except NoValidActions as error:
                    text = f"internal error: {_one_line(error)}"
                    logger.error("%s %s", peer, text)
                    await _fail(websocket, text, INTERNAL_ERROR_REASON)
                    return
                except Exception as error:
                    logger.exception("%s internal error", peer)
                    text = f"internal error: {type(error).__name__}: {_one_line(error)}"
                    await _fail(websocket, text, INTERNAL_ERROR_REASON)
                    return
                await websocket.send(reply)
                served, infer_total = served + 1, infer_total + infer_ms
                prev_total = time.monotonic() - start
        except websockets.ConnectionClosed:
            sent = websocket.protocol.close_sent
            if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
                logger.warning(
                    "%s refused: %s (--max-message-mb); closed with 1009", peer, sent.reason
                )
        finally:
            mean = f", mean infer {infer_total / served:.1f} ms" if served else ""
            logger.info(
                "%s disconnected (code %s) after %d requests%s",
                peer,
                websocket.close_code,
                served,
                mean,
            )

    async def _answer(self, message, prev_total):
        obs = self._decode(message)
        queued = time.monotonic()
        loop = asyncio.get_running_loop()
        result, started, infer_s = await loop.run_in_executor(self._worker, self._infer, obs)
        timing = {"infer_ms": infer_s * 1000.0, "queue_ms": (started - queued) * 1000.0}
        if prev_total is not None:
            timing["prev_total_ms"] = prev_total * 1000.0
        result["server_timing"] = timing
        return msgpack_codec.packb(result), timing["infer_ms"]

    def _decode(self, message):
        if isinstance(message, str):
            raise BadRequest(
                "expected a binary msgpack observation, got a text frame; send "
                "msgpack_numpy.packb(obs) as bytes."
            )
        try:
            obs = msgpack_codec.unpackb(message)
        except msgpack_codec.MalformedArray as error:
            raise BadRequest(f"the message holds a malformed array: {error}") from None
        except Exception as error:  # msgpack raises many kinds on garbage
            raise BadRequest(
                f"the message is not a msgpack observation: {msgpack_codec.explain(error)}"
            ) from None
        if not isinstance(obs, dict):
            raise BadRequest(
                f"the message must be a msgpack map of named arrays (an observation dict), "
                f"got {type(obs).__name__}."
            )
        return obs

    def _infer(self, obs):
        started = time.monotonic()
        result = self.policy.infer(obs)
        return result, started, time.monotonic() - started

async def _fail(websocket, text, reason):
    """Sends `text` as a text frame (openpi's error reply) and closes with 1011."""
    await websocket.send(text)
    await websocket.close(code=CloseCode.INTERNAL_ERROR, reason=reason)


def _peer(connection):
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown peer"
