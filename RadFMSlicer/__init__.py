"""RadFMSlicer: run the RadFM radiology foundation model locally on CT/MR volumes.

Research use only: not a medical device; answers must be checked by a qualified reader.
"""

__version__ = "0.1.0"
