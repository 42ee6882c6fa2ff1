"""Which texts of a shown panel a radiologist cannot read in full: clipped, cut off or hidden.

Shared by ``test_panel.py`` (PySide6) and ``panel_smoke.py`` (PySide6 and real PythonQt),
so both bindings are held to the same rule. Properties are read through ``qt_shim.get``
(PythonQt exposes them as attributes). A text counts as readable when it is drawn whole
inside what its scroll area or the panel shows; a line edit's hint when it fits the box or
its tooltip holds it (Qt cuts a long hint short with an ellipsis). Combo boxes are left out:
PythonQt offers no way to ask the style for their text's room (the panel's name boxes carry
the chosen name in their tooltip, which test_panel checks).
"""

from RadFMModuleLib.qt_shim import QtCore, QtGui, QtWidgets, get


def unreadable_at(panel, width: int, height: int = 940) -> list:
    """``unreadable_texts`` of the panel resized to ``width``; first, if its layout keeps it wider, by how much."""
    panel.resize(width, height)
    problems = unreadable_texts(panel)
    if get(panel, "width") > width:
        problems.insert(0, f"the panel cannot be narrower than {get(panel, 'width')} px")
    return problems


def unreadable_texts(panel) -> list:
    """One line per text drawn cut: ``"QLabel 'Conversation saved as talk.json': needs 262 x 20 px, has 180 x 20"``."""
    widgets = _settled(panel)
    return [problem for widget in widgets if get(widget, "visible") for problem in cuts_of(widget, panel)]


def _settled(panel) -> list:
    """The panel's widgets once their layouts have settled: a layout request travels one parent up
    per pass of the event loop (and a label that re-breaks its words asks again)."""
    widgets, placed, unchanged = panel.findChildren(QtWidgets.QWidget), None, 0
    for _ in range(50):
        QtWidgets.QApplication.processEvents()
        now = [(r.x(), r.y(), r.width(), r.height()) for r in (get(widget, "geometry") for widget in widgets)]
        unchanged = unchanged + 1 if now == placed else 0
        if unchanged == 3:
            break
        placed = now
    return widgets


def cuts_of(widget, panel) -> list:
    """How the text of one shown widget of ``panel`` is cut, if it is (empty: it reads in full)."""
    if isinstance(widget, QtWidgets.QLineEdit):
        return _hint_cut(widget)
    text = get(widget, "text") if hasattr(widget, "text") else None
    if not isinstance(text, str) or not text.strip():
        return []
    name = f"{type(widget).__name__} {text[:60]!r}"
    need, has = _text_room(widget)
    outside = _cut_by_ancestor(widget, panel)
    cuts = [f"{name}: {outside}"] if outside else []
    if need.width() > has.width() or need.height() > has.height():
        cuts.append(f"{name}: needs {need.width()} x {need.height()} px, has {has.width()} x {has.height()}")
    return cuts


def _text_room(widget):
    """(size the text needs, size it has). A wrapped label needs its height for its width, a
    one-line label its size hint; a button (buttons neither wrap nor elide) its size hint's
    width and the height of its lines (and picture), as it may lose its padding but no text."""
    size = QtCore.QSize(get(widget, "width"), get(widget, "height"))
    if isinstance(widget, QtWidgets.QLabel) and get(widget, "wordWrap"):
        room = widget.contentsRect().width()
        widest = _widest_wrapped_line(get(widget, "text"), get(widget, "font"), room)
        return QtCore.QSize(widest + size.width() - room, widget.heightForWidth(size.width())), size
    if isinstance(widget, QtWidgets.QLabel):
        return get(widget, "sizeHint"), size
    if isinstance(widget, QtWidgets.QAbstractButton):
        height = QtGui.QFontMetrics(get(widget, "font")).height() * (get(widget, "text").count("\n") + 1)
        under_icon = isinstance(widget, QtWidgets.QToolButton) and (
            get(widget, "toolButtonStyle") == QtCore.Qt.ToolButtonTextUnderIcon)
        if under_icon:
            height += get(widget, "iconSize").height()
        return QtCore.QSize(get(widget, "sizeHint").width(), height), size
    return QtCore.QSize(0, 0), size


def _widest_wrapped_line(text: str, font, width: int) -> int:
    """The widest line of ``text`` wrapped as a label wraps it: only where Unicode allows a break, so a
    word that has none (a Windows path, a long file name) stays whole and may run out of ``width``."""
    option = QtGui.QTextOption()
    option.setWrapMode(QtGui.QTextOption.WordWrap)
    widest = 0.0
    for paragraph in text.split("\n"):
        layout = QtGui.QTextLayout(paragraph, font)
        layout.setTextOption(option)
        layout.beginLayout()
        line = layout.createLine()
        while line.isValid():
            line.setLineWidth(width)
            widest = max(widest, line.naturalTextWidth())
            line = layout.createLine()
        layout.endLayout()
    return round(widest)  # Qt lays text out in fractions of a pixel


def _hint_cut(edit) -> list:
    """The empty box's hint (placeholder), if it is longer than the box and not in the tooltip."""
    hint = get(edit, "placeholderText")
    if get(edit, "text") or not hint or hint in get(edit, "toolTip"):
        return []
    frame = edit.style().pixelMetric(QtWidgets.QStyle.PM_DefaultFrameWidth)
    room = edit.contentsRect().width() - 2 * (frame + 2)  # Qt's frame and its 2 px text margin, each side
    need = QtGui.QFontMetrics(get(edit, "font")).horizontalAdvance(hint)
    return [f"QLineEdit hint {hint!r}: needs {need} px, has {room}"] if need > room else []


def _cut_by_ancestor(widget, panel) -> str:
    """Why the widget sticks out of the scroll area viewport or panel it sits in ('' if it does not)."""
    left = widget.mapTo(panel, QtCore.QPoint(0, 0)).x()
    right = left + get(widget, "width")
    parent = widget.parentWidget()
    while parent is not None and parent is not panel:
        if get(parent, "objectName") == "qt_scrollarea_viewport":
            start = parent.mapTo(panel, QtCore.QPoint(0, 0)).x()
            if left < start or right > start + get(parent, "width"):
                return f"spans x {left}..{right}, its scroll area shows {start}..{start + get(parent, 'width')}"
        parent = parent.parentWidget()
    if left < 0 or right > get(panel, "width"):
        return f"spans x {left}..{right}, the panel is {get(panel, 'width')} px wide"
    return ""
