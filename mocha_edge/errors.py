"""Typed exceptions. Library code raises these; only the CLI turns them into a one-line message + exit code."""


class MochaError(Exception):
    """Base class for every error mocha-edge reports to a user."""

    exit_code = 1


class DataError(MochaError):
    """A dataset cannot be used (missing folders, no usable image, unreadable YAML/JSON...)."""


class CacheError(MochaError):
    """A teacher cache is corrupt, stale or belongs to another dataset / teacher / d_t."""


class TeacherError(MochaError):
    """A teacher cannot be built or run (missing weights, missing extra, wrong dataset)."""


class MissingDependencyError(MochaError):
    """An optional dependency is not installed; the message names the pip extra to install."""


class ExportError(MochaError):
    """An export cannot be made or an exported artefact cannot be used (missing sidecar, bad calibration set)."""
