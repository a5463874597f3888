"""The one place where backend-specific code lives."""

from keras_openpi.backend.compiled import CompiledProgram
from keras_openpi.backend.cpu_memory import retain_freed_memory

__all__ = ["CompiledProgram", "retain_freed_memory"]
