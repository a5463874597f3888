"""`keras-openpi serve`: serve a checkpoint to robots with openpi's websocket protocol.

Any robot runtime built on openpi's `openpi-client` connects unchanged:
`WebsocketClientPolicy(host, port, api_key=...)`.
"""

import logging
import os

API_KEY_ENV = "KERAS_OPENPI_API_KEY"


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
        "model", help="the checkpoint: a .keras file, or a `keras-openpi train` checkpoint directory"
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
            "'byte' for 259-token demo models, else none: clients send tokenized_prompt)"
        ),
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Api-Key KEY' from clients (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--record", metavar="DIR", help="save every request and reply to DIR")
    parser.add_argument(
        "--num-steps", type=int, default=10, help="Euler sampling steps (default 10)"
    )
    parser.add_argument(
        "--delta-actions",
        action="store_true",
        help="the model predicts joint actions relative to the state (openpi's pi0_aloha)",
    )
    parser.add_argument("--seed", type=int, help="seed of the sampling noise")
    parser.add_argument(
        "--fixed-noise",
        action="store_true",
        help="start every request from the same noise (drawn from --seed): deterministic actions",
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=100.0,
        help="largest request in MiB; larger ones get an error reply (default 100)",
    )
    return parser


def run(args):
    from keras_openpi.serving import Policy
    from keras_openpi.serving import PolicyRecorder
    from keras_openpi.serving import PolicyServer

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    if args.max_message_mb <= 0:
        raise ValueError(f"--max-message-mb must be positive, got {args.max_message_mb}.")
    policy = Policy.from_checkpoint(
        args.model,
        robot=args.robot,
        norm_stats=args.norm_stats,
        default_prompt=args.default_prompt,
        tokenizer=args.tokenizer,
        delta_actions=args.delta_actions,
        num_steps=args.num_steps,
        seed=args.seed,
        fixed_noise=args.fixed_noise,
    )
    logging.getLogger("keras_openpi.serving").info(
        "sampler compiled in %.1f s (%d steps)", policy.warmup_seconds, policy.num_steps
    )
    if args.record:
        policy = PolicyRecorder(policy, args.record)
    server = PolicyServer(
        policy,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_message_bytes=int(args.max_message_mb * 2**20),
    )
    server.serve_forever()
    return 0
