"""The one place where backend-specific code lives."""

from keras_openpi.backend.compiled import CompiledProgram

__all__ = ["CompiledProgram"]
