"""User-facing errors. The CLI prints `error: <message>` for these, one line, no traceback.

Anything else escaping to the top level is a bug and keeps its traceback.
"""
import argparse


class LavidaError(Exception):
    """Base class: a problem with the user's input, not with the code."""


class ConfigError(LavidaError):
    """config.json (or a config dict) is missing a key or holds an unsupported value."""


class CheckpointError(LavidaError):
    """A checkpoint folder is missing, partial, or its tensors do not match the model."""


class ImageError(LavidaError):
    """An image cannot be read or is unusable (corrupt, truncated, too small, too large)."""


class InputError(LavidaError):
    """A flag or argument value is invalid (bad prune method, lengths, ratios, empty question)."""


class DataError(LavidaError):
    """An evaluation data set is missing a file, or one of its records is malformed (the message names them)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error: ...` line on stderr (exit 2) like every other input error,
    not the usage block plus the message. Every command-line entry point uses it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")
