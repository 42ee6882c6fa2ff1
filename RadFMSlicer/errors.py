"""Errors a user can act on.

Every failure that comes from user input (a folder, a scan, a setting) is raised as a
subclass of :class:`RadFMError` with a one-line message saying what is wrong and what to
do; the CLI prints it without a traceback and the worker sends it back as an error reply.
"""

import re


class RadFMError(Exception):
    """Base class: a problem the user can fix, described in one actionable line."""


class CheckpointError(RadFMError):
    """The checkpoint folder, weight file or tokenizer folder is missing or unusable."""


class DeviceMemoryError(CheckpointError):
    """A precision tier does not fit the device's free memory; the message names the tiers that do."""

    FITS = "tiers that fit: "  # then "<tier> (~<GiB> GiB), ..."

    @classmethod
    def tiers_in(cls, message: str) -> list:
        """The fitting tiers a DeviceMemoryError's message names (it reaches the Slicer panel as text)."""
        return re.findall(r"(\w+) \(~", message.split(cls.FITS, 1)[1]) if cls.FITS in message else []


class ImageError(RadFMError):
    """A scan, array, window or region cannot be turned into a model input."""


class PromptError(RadFMError):
    """A prompt or generation setting is invalid (e.g. images and image tags disagree)."""



class RequestError(RadFMError, ValueError):
    """A request names a field it does not have, or gives one the wrong type (a dict for ``settings``,
    a string for ``images``): refused at the door, naming the field and what it takes."""
class RecordError(RadFMError):
    """An answer cannot be written to the record as DICOM (a scan that is not DICOM, a missing source)."""
