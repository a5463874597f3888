"""`keras-openpi serve`: serve a checkpoint to robots with openpi's websocket protocol.

Any robot runtime built on openpi's `openpi-client` connects unchanged:
`WebsocketClientPolicy(host, port, api_key=...)`.
"""

import errno
import logging
import math
import os
import pathlib
import socket

API_KEY_ENV = "KERAS_OPENPI_API_KEY"
DEFAULT_MAX_MESSAGE_MB = 64.0


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "serve",
        help="serve a policy over websockets (openpi's protocol, for openpi-client)",
        description=(
            "Serves MODEL to robots over openpi's websocket protocol; any openpi-client "
            "WebsocketClientPolicy connects unchanged. GET /healthz answers 200 OK."
        ),
    )
    parser.add_argument(
        "model",
        help=(
            "the checkpoint (π0, π0.5 or π0-FAST): a .keras file, or a `keras-openpi train` "
            "checkpoint directory"
        ),
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 serves the network)",
    )
    parser.add_argument(
        "--robot",
        default="raw",
        choices=["aloha", "droid", "libero", "metaworld", "raw"],
        help="the robot's observation format (default raw: the model's own layout)",
    )
    parser.add_argument(
        "--norm-stats",
        help="norm_stats.json to use (default: the one next to MODEL or in its assets/)",
    )
    parser.add_argument("--default-prompt", help="prompt for observations that carry none")
    parser.add_argument(
        "--tokenizer",
        help=(
            "prompt tokenizer: a SentencePiece .model file (PaliGemma's) or 'byte' (default: "
            "'byte' for 259-token demo models, else none: clients send tokenized_prompt). "
            "π0-FAST uses the tokenizer it carries; for one that carries none, a directory "
            "with paligemma_tokenizer.model and fast/"
        ),
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=(
            f"require 'Authorization: Api-Key KEY' from clients (default: ${API_KEY_ENV}); "
            "an empty key is refused: leave both unset to serve without authentication"
        ),
    )
    parser.add_argument("--record", metavar="DIR", help="save every request and reply to DIR")
    parser.add_argument(
        "--num-steps", type=int, help="π0 / π0.5: Euler sampling steps (default 10)"
    )
    parser.add_argument(
        "--max-decoding-steps",
        type=int,
        help="π0-FAST: the most tokens to decode per request (default 256)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        help="π0-FAST: 0 decodes greedily (default), above 0 samples (seeded by --seed)",
    )
    parser.add_argument(
        "--delta-actions",
        action="store_true",
        help="the model predicts joint actions relative to the state (openpi's pi0_aloha)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of the sampling noise (π0-FAST: of its token sampling)"
    )
    parser.add_argument(
        "--fixed-noise",
        action="store_true",
        help=(
            "π0 / π0.5: start every request from the same noise (drawn from --seed): "
            "deterministic actions"
        ),
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=DEFAULT_MAX_MESSAGE_MB,
        help=(
            "largest request in MiB; a larger one is refused from its header, before it is "
            f"read (close code 1009). Default {DEFAULT_MAX_MESSAGE_MB:g}: four 720p float32 "
            "cameras; three 224x224 uint8 cameras are 0.45 MiB"
        ),
    )
    return parser


def run(args):
    from keras_openpi.serving import Policy
    from keras_openpi.serving import PolicyRecorder
    from keras_openpi.serving import PolicyServer

    # INFO for keras_openpi's own lines; other libraries (JAX, websockets) warnings only.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("keras_openpi").setLevel(logging.INFO)
    check_args(args)
    policy = Policy.from_checkpoint(
        args.model,
        robot=args.robot,
        norm_stats=args.norm_stats,
        default_prompt=args.default_prompt,
        tokenizer=args.tokenizer,
        delta_actions=args.delta_actions,
        num_steps=args.num_steps,
        max_decoding_steps=args.max_decoding_steps,
        temperature=args.temperature,
        seed=args.seed,
        fixed_noise=args.fixed_noise,
    )
    options = ", ".join(f"{k} {v}" for k, v in policy.sample_options.items())
    logging.getLogger("keras_openpi.serving").info(
        "sampler compiled in %.1f s (%s)", policy.warmup_seconds, options
    )
    if args.record:
        policy = PolicyRecorder(policy, args.record)
    server = PolicyServer(
        policy,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_message_bytes=int(args.max_message_mb * 2**20),
    )
    try:
        server.serve_forever()
    except OSError as error:
        raise ValueError(_listen_error(args, error)) from None
    return 0


def check_args(args):
    """Refuses bad flags before the model loads (which can take minutes).

    Raises:
        ValueError: naming the flag, what was expected and what was given.
    """
    from keras_openpi.serving.server import check_api_key

    try:
        check_api_key(args.api_key)
    except ValueError as error:
        where = "--api-key"
        if os.environ.get(API_KEY_ENV) is not None:
            where += f" (or ${API_KEY_ENV})"
        raise ValueError(f"{where}: {error}") from None
    mb = args.max_message_mb
    if not (math.isfinite(mb) and mb * 2**20 >= 1):
        raise ValueError(f"--max-message-mb must be a positive number of MiB, got {mb}.")
    steps = (("--num-steps", args.num_steps), ("--max-decoding-steps", args.max_decoding_steps))
    for flag, value in steps:
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}.")
    if args.temperature is not None and not (
        math.isfinite(args.temperature) and args.temperature >= 0
    ):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}.")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {args.port}.")
    if args.record:
        record = pathlib.Path(args.record)
        if record.exists() and not record.is_dir():
            raise ValueError(f"--record {record}: exists and is not a directory.")
        parent = next((p for p in (record, *record.parents) if p.exists()), pathlib.Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--record {record}: {parent} is not writable.")
    _check_can_listen(args)


def _check_can_listen(args):
    """Binds and releases `--host:--port`, so that a taken port fails before the model loads."""
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as error:
        raise ValueError(_listen_error(args, error)) from None


def _listen_error(args, error):
    reason = error.strerror or str(error)
    hint = " (choose another --port)" if error.errno == errno.EADDRINUSE else ""
    return f"cannot listen on --host {args.host} --port {args.port}: {reason}{hint}."
