"""Errors a user can act on.

Every failure that comes from user input (a folder, a scan, a setting) is raised as a
subclass of :class:`RadFMError` with a one-line message saying what is wrong and what to
do; the CLI prints it without a traceback and the worker sends it back as an error reply.
"""


class RadFMError(Exception):
    """Base class: a problem the user can fix, described in one actionable line."""


class CheckpointError(RadFMError):
    """The checkpoint folder, weight file or tokenizer folder is missing or unusable."""


class ImageError(RadFMError):
    """A scan, array, window or region cannot be turned into a model input."""


class PromptError(RadFMError):
    """A prompt or generation setting is invalid (e.g. images and image tags disagree)."""

