"""One import for Qt, so the panel runs both inside Slicer and under plain PySide6.

Inside Slicer, PythonQt exposes every class in one flat ``qt`` module; outside, Qt.py
over PySide6 splits them across QtWidgets/QtCore/QtGui. Both accept the old-style enum
spelling (``QtCore.Qt.AlignTop``), which the panel uses throughout. PythonQt cannot
declare new signals, so the panel reports to its owner through plain callbacks.
"""

try:
    import qt  # PythonQt, only present inside Slicer

    QtCore = QtGui = QtWidgets = qt
    IN_SLICER = True
except ImportError:
    from Qt import QtCore, QtGui, QtWidgets  # noqa: F401 (re-exported)

    IN_SLICER = False


def ask_save_path(parent, caption: str, name_filter: str) -> str:
    """Save-file dialog; PySide returns ``(path, filter)`` where PythonQt returns the path."""
    result = QtWidgets.QFileDialog.getSaveFileName(parent, caption, "", name_filter)
    return result[0] if isinstance(result, tuple) else result


def ask_existing_dir(parent, caption: str, start: str = "") -> str:
    return QtWidgets.QFileDialog.getExistingDirectory(parent, caption, start)


def ask_open_path(parent, caption: str, start: str = "") -> str:
    result = QtWidgets.QFileDialog.getOpenFileName(parent, caption, start)
    return result[0] if isinstance(result, tuple) else result


def get(obj, name: str):
    """Read a Qt property: PythonQt exposes it as an attribute (``button.checked``), PySide as its
    getter method, named like the property or, for a flag, ``is`` + Name (``isChecked()``)."""
    if hasattr(obj, name):
        value = getattr(obj, name)
    else:
        value = getattr(obj, "is" + name[:1].upper() + name[1:])
    return value() if callable(value) else value


def ask_edited_text(parent, caption: str, label: str, text: str) -> "str | None":
    """A multi-line text to edit; None when cancelled. PySide returns ``(text, ok)``; PythonQt returns
    the text only, empty when cancelled (an emptied draft is then taken as cancelled too)."""
    result = QtWidgets.QInputDialog.getMultiLineText(parent, caption, label, text)
    if isinstance(result, tuple):
        return result[0] if result[1] else None
    return result or None
