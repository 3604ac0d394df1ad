"""Error types: one per kind of bad input, so callers can catch precisely and messages can say what to fix.

All derive from `SplinterpError`; most also derive from the builtin a user would expect (ValueError,
TypeError, FileNotFoundError) so generic handlers keep working.
"""

from __future__ import annotations


class SplinterpError(Exception):
    """Base class of every error splinterp raises on purpose."""


class ShapeError(SplinterpError, ValueError):
    """An array has the wrong number of dimensions or the wrong size along one of them."""


class DTypeError(SplinterpError, TypeError):
    """An array has a dtype we refuse to convert silently (e.g. int pixels, float64 into a float32 SAE)."""


class NonFiniteError(SplinterpError, ValueError):
    """Data contains NaN or inf; the message names the first bad row."""


class EmptyDataError(SplinterpError, ValueError):
    """A data set has no rows."""


class ConfigError(SplinterpError, ValueError):
    """A configuration is inconsistent (k > d_sae, unknown architecture, negative rate, ...)."""


class DeviceError(ConfigError):
    """A device that is not available here, or tensors that must share a device do not."""


class NotAnSAEFolderError(SplinterpError, FileNotFoundError):
    """A folder lacks the files of any SAE format we can read."""


class CorruptFileError(SplinterpError, ValueError):
    """A file exists but cannot be parsed, is truncated, or disagrees with its companion files."""


class ChecksumError(CorruptFileError):
    """A file's bytes do not match the checksum recorded next to it (a cache manifest, an SAE's cfg.json)."""


class OverwriteError(SplinterpError, FileExistsError):
    """A write would replace something that is not ours to replace (a file, or a folder with other content)."""


class DatasetNotFoundError(SplinterpError, FileNotFoundError):
    """A data set's files are not where we looked; the message says how to get them."""


class NotFittedError(SplinterpError, RuntimeError):
    """A reference autoencoder was used before `fit`."""


class TooLargeError(ConfigError):
    """A computation would exceed a size limit (`max_cells`, `max_regions`) or the device's memory; refused
    before the work, and the message gives the predicted size."""


class ScoreOverflowError(SplinterpError, OverflowError):
    """Finite inputs whose encoder scores overflow the SAE's dtype (inf or NaN scores): the regions there are
    not defined in that dtype. The message names the first row."""


class PrecisionError(SplinterpError, ArithmeticError):
    """A geometric answer cannot be certified at the working precision (e.g. an LP witness that does not
    reproduce its pattern in the SAE's dtype); reported instead of an answer that may be wrong."""


class UnsupportedObjectError(SplinterpError, TypeError):
    """An object is not one we can use as an SAE (not ours, nor a SAELens / sparsify / dictionary_learning SAE)."""


class FolderInUseError(SplinterpError, RuntimeError):
    """Another run holds the lock of a folder this run would write to (two writers would corrupt it)."""


class NotWritableError(SplinterpError, PermissionError):
    """An output location cannot be written (permissions, read-only file system); found before any work."""


class NotAModelError(SplinterpError, TypeError):
    """An argument that must be a model (an object with `encode` and `decode`) is something else."""


class PathNotFoundError(SplinterpError, FileNotFoundError):
    """A file or folder that an argument names does not exist (a checkpoint to resume from, ...)."""


class NotAFigureError(SplinterpError, TypeError):
    """Something given to be displayed as a figure is not a matplotlib or plotly figure, nor a PNG file."""


class BrowserNotFoundError(SplinterpError, FileNotFoundError):
    """No Chromium / Chrome to draw a plotly figure as PNG; the message says how to get one."""


class FigureRenderError(SplinterpError, RuntimeError):
    """A figure could not be drawn (the headless browser failed, or ran past its time limit)."""


class NotebookError(SplinterpError, RuntimeError):
    """A notebook failed to run, or does not show the figures it says it shows."""
