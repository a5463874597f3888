"""Why a training run stopped: the errors `keras-openpi train` reports with a non-zero exit."""


class TrainingStopped(RuntimeError):
    """The run stopped before its end; the message says at which step and what was kept."""


class NonFiniteError(TrainingStopped):
    """A non-finite loss, gradient norm or weight: nothing from that step on is saved."""


class CheckpointWriteError(OSError):
    """A checkpoint or export could not be written (e.g. a full disk); nothing half is left.

    Built as `CheckpointWriteError(errno, message)`; `str()` is the message alone.
    """

    def __str__(self):
        return self.strerror or super().__str__()
