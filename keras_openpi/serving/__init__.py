"""Serving policies to robots: `Policy`, openpi's websocket protocol, recording."""

from keras_openpi.serving.policy import Policy
from keras_openpi.serving.recorder import PolicyRecorder
from keras_openpi.serving.server import PolicyServer

__all__ = ["Policy", "PolicyRecorder", "PolicyServer"]
