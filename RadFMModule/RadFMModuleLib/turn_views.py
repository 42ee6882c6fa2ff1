"""The conversation's building blocks: one user turn, one streaming answer, foldable sections.

Plain widgets with no panel state, so ``chat_panel.ChatPanel`` reads as the flow of a
conversation. Everything here runs under PythonQt (Slicer) and PySide6 alike: Qt
properties are read through ``qt_shim.get`` and no ``QKeyEvent`` method is called on an
event PythonQt hands over as a plain ``QEvent``.
"""

import re

from .qt_shim import QtCore, QtGui, QtWidgets, get

TASK_LABELS = {"vqa": "Question", "diagnosis": "Diagnosis", "report": "Draft report",
               "rationale": "Diagnosis and rationale", "modality": "Modality"}
STOP_NOTES = {"length": "Stopped at the length limit.", "cancelled": "Stopped before the end.",  # status line
              "context": "Stopped: the model's context is full (the prompt and the answer fill it)."}
ANSWER_NOTES = {"length": "length limit", "cancelled": "stopped",  # an answer's header: short, beside its title
                "context": "context full"}
NOTICE = "Research use only. Not a medical device: check every statement against the images."
CURSOR = "\u258d"
THUMB_PX = 96


def theme_colors(palette) -> dict:
    """Colours derived from the application palette, so Slicer's dark theme stays readable."""
    text, base = palette.color(QtGui.QPalette.Text), palette.color(QtGui.QPalette.Base)
    accent = palette.color(QtGui.QPalette.Highlight)

    def mix(a, b, t):
        return QtGui.QColor(*(round(x * (1 - t) + y * t) for x, y in
                              zip((a.red(), a.green(), a.blue()), (b.red(), b.green(), b.blue())))).name()

    return {"text": text.name(), "base": base.name(), "accent": accent.name(), "muted": mix(text, base, 0.42),
            "user": mix(base, accent, 0.09), "border": mix(base, text, 0.16), "error": "#b3261e"}


STYLE = """
QScrollArea#conversation, QWidget#turns {{ background: {base}; }}
QScrollArea#conversation {{ border: 1px solid {border}; border-radius: 4px; }}
QFrame#userTurn {{ background: {user}; border-radius: 6px; }}
QFrame#answerTurn {{ background: {base}; border: 1px solid {border}; border-left: 3px solid {accent};
                    border-radius: 6px; }}
QLabel {{ color: {text}; }}
QLabel#who {{ font-weight: bold; }}
QLabel#muted, QLabel#notice, QLabel#status {{ color: {muted}; }}
QLabel#notice {{ font-style: italic; }}
QLabel#error {{ color: {error}; }}
QLabel#details {{ color: {text}; background: {user}; border-radius: 4px; padding: 6px; }}
QLabel#empty {{ color: {muted}; padding: 24px; }}
QPushButton#link {{ color: {accent}; background: transparent; border: none; padding: 2px 0px; margin-right: 14px; }}
QPushButton#link:hover {{ text-decoration: underline; }}
QPushButton#link:disabled {{ color: {muted}; }}
"""


class WrappedLabel(QtWidgets.QLabel):
    """A wrapped label that also breaks a word wider than itself (a Windows path, a long file name).

    Qt wraps only where Unicode allows a line break: a longer word ran out of the label and, as
    the label's minimum width, made the whole panel wider than Slicer's side panel. This label
    asks for no width and, while shown, puts zero-width spaces into each word wider than itself
    (after \\ / _ - . , ; : =, and between letters where a piece is still too wide); a word that
    fits is shown as written. ``setText`` keeps the text given in ``full_text``.
    """

    def __init__(self, text=""):
        super().__init__()
        self.full_text = ""
        self.setWordWrap(True)
        policy = QtWidgets.QSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)
        self.setText(text)

    def setText(self, text):
        self.full_text = text
        self._fit()

    def resizeEvent(self, event):  # QLabel has no resizeEvent or showEvent of its own to call
        self._fit()

    def showEvent(self, event):
        self._fit()

    def _fit(self):
        shown = self.full_text
        if get(self, "visible"):
            shown = break_long_words(shown, QtGui.QFontMetrics(get(self, "font")), self.contentsRect().width())
        if shown != get(self, "text"):
            QtWidgets.QLabel.setText(self, shown)


ZERO_WIDTH_SPACE = "\u200b"
BREAK_AFTER = re.compile(r"(?<=[\\/_.,;:=-])")


def break_long_words(text: str, metrics, width: int) -> str:
    """``text`` with zero-width spaces in each word wider than ``width`` px (see ``WrappedLabel``).

    Only words with more letters than the widest letter fits into ``width`` are measured: the
    answer is re-fitted at every streamed token.
    """
    def breakable(match):
        word = match.group()
        if metrics.horizontalAdvance(word) <= width:
            return word
        pieces = [piece for piece in BREAK_AFTER.split(word) if piece]
        return ZERO_WIDTH_SPACE.join(piece if metrics.horizontalAdvance(piece) <= width
                                     else ZERO_WIDTH_SPACE.join(piece) for piece in pieces)
    always_fit = max(width, 0) // max(metrics.maxWidth(), 1)
    return re.sub(r"\S{%d,}" % (always_fit + 1), breakable, text)


def text_label(text="", name=None, point_delta=0, wrap=True) -> QtWidgets.QLabel:
    label = WrappedLabel(text) if wrap else QtWidgets.QLabel(text)
    label.setTextFormat(QtCore.Qt.PlainText)
    label.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
    if name:
        label.setObjectName(name)
    if point_delta:
        resize_font(label, point_delta)
    return label


def resize_font(widget, point_delta: float):
    font = get(widget, "font")
    font.setPointSizeF(font.pointSizeF() + point_delta)
    widget.setFont(font)


def wrap_lines(text: str, metrics, width: int) -> str:
    """``text`` broken at spaces into lines at most ``width`` px wide; a word too long for a line is cut
    in its middle with an ellipsis (its whole is in the widget's tooltip)."""
    lines = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and metrics.horizontalAdvance(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(metrics.elidedText(word, QtCore.Qt.ElideMiddle, width))
    return "\n".join(lines)


def hrow(*widgets, stretch_at=None) -> QtWidgets.QHBoxLayout:
    row = QtWidgets.QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    for n, widget in enumerate(widgets):
        if n == stretch_at:
            row.addStretch(1)
        row.addWidget(widget)
    if stretch_at == len(widgets):
        row.addStretch(1)
    return row


class FlowGrid(QtWidgets.QWidget):
    """Widgets side by side in as many columns as the width holds, the rest on further rows.

    Qt has no flow layout: three thumbnails or task buttons in one row are wider than Slicer's
    side panel at its larger font sizes, and a row too wide for the panel cuts every text beside
    it. This holder asks for no width, tells its parent layout the height it needs at a width
    (height for width, as a wrapped label does) and, at each resize, re-places the widgets in
    the grid of its one child (``fill``: the columns share the width, as buttons do; else they
    keep to the left). The grid sits on a child because Qt asks a widget with a layout of its
    own that layout's height for width, not the widget's.
    """

    SPACING = 6

    def __init__(self, fill: bool = False):
        super().__init__()
        policy = QtWidgets.QSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)
        self.content = QtWidgets.QWidget(self)
        self.grid = QtWidgets.QGridLayout(self.content)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(self.SPACING)
        self.fill = fill
        self.widgets = []
        self.columns = 0

    def add(self, widget):
        self.widgets.append(widget)
        self._place(self._columns_fitting(get(self, "width")))
        self.updateGeometry()  # a new height for every width

    def hasHeightForWidth(self):
        return True

    def heightForWidth(self, width):
        columns = self._columns_fitting(width)
        heights = [get(widget, "sizeHint").height() for widget in self.widgets]
        rows = [max(heights[n:n + columns]) for n in range(0, len(heights), columns)]
        return sum(rows) + (len(rows) - 1) * self.SPACING

    def resizeEvent(self, event):  # no super() call: PythonQt has no Python-visible base method
        columns = self._columns_fitting(get(self, "width"))
        if columns != self.columns:
            self._place(columns)
        self.content.setGeometry(get(self, "rect"))

    def _columns_fitting(self, width: int) -> int:
        """The most columns whose widest widgets, side by side, fit ``width``."""
        widths = [get(widget, "sizeHint").width() for widget in self.widgets]
        for columns in range(len(widths), 1, -1):
            if sum(max(widths[c::columns]) for c in range(columns)) + (columns - 1) * self.SPACING <= width:
                return columns
        return 1

    def _place(self, columns: int):
        for widget in self.widgets:
            self.grid.removeWidget(widget)
        for n in range(self.columns + 1):
            self.grid.setColumnStretch(n, 0)
        for n, widget in enumerate(self.widgets):
            self.grid.addWidget(widget, n // columns, n % columns)
        for n in range(columns) if self.fill else [columns]:
            self.grid.setColumnStretch(n, 1)
        self.columns = columns


class EnterSends(QtCore.QObject):
    """Enter sends the question, Shift+Enter breaks the line.

    Only ``KeyPress`` is looked at: PythonQt hands Python a ``QKeyEvent`` for KeyPress and
    KeyRelease but a plain ``QEvent`` for ShortcutOverride. Slicer's single-key shortcuts
    stay quiet while typing because the text widgets accept ShortcutOverride themselves
    for the keys they edit with (printable keys, Delete, arrows), before any shortcut fires.
    """

    def __init__(self, parent, on_enter):
        super().__init__(parent)
        self.on_enter = on_enter

    def eventFilter(self, watched, event):
        if (event.type() == QtCore.QEvent.KeyPress and event.key() in (QtCore.Qt.Key_Return, QtCore.Qt.Key_Enter)
                and not (event.modifiers() & QtCore.Qt.ShiftModifier)):
            self.on_enter()
            return True
        return False


class Section:
    """A titled block that folds away (ctkCollapsibleButton is Slicer-only)."""

    def __init__(self, title: str, expanded: bool):
        self.widget = QtWidgets.QWidget()
        self.toggle = QtWidgets.QToolButton()
        self.toggle.setText(title)
        self.toggle.setCheckable(True)
        self.toggle.setAutoRaise(True)
        self.toggle.setToolButtonStyle(QtCore.Qt.ToolButtonTextBesideIcon)
        font = get(self.toggle, "font")
        font.setBold(True)
        self.toggle.setFont(font)
        self.body = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(self.widget)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.toggle)
        layout.addWidget(self.body)
        self.toggle.toggled.connect(self.set_open)
        self.toggle.setChecked(expanded)
        self.set_open(expanded)

    def set_open(self, expanded: bool):
        self.toggle.setArrowType(QtCore.Qt.DownArrow if expanded else QtCore.Qt.RightArrow)
        self.body.setVisible(expanded)


class UserTurnView:
    def __init__(self, task: str, question: str, context: str):
        self.frame = QtWidgets.QFrame()
        self.frame.setObjectName("userTurn")
        layout = QtWidgets.QVBoxLayout(self.frame)
        layout.setContentsMargins(10, 8, 10, 8)
        layout.setSpacing(3)
        layout.addWidget(text_label(f"You \u00b7 {TASK_LABELS.get(task, task)}", "who"))
        if question:
            layout.addWidget(text_label(question, point_delta=0.5))
        if context:
            layout.addWidget(text_label(context, "muted", point_delta=-1))


class AnswerView:
    """One answer: streams in, then shows thumbnails of what the model saw and its provenance."""

    def __init__(self, task: str, show_attention=None):
        self.text = ""
        self.show_attention = show_attention  # called with the turn by "Show attention" (a map came with it)
        self.frame = QtWidgets.QFrame()
        self.frame.setObjectName("answerTurn")
        layout = QtWidgets.QVBoxLayout(self.frame)
        layout.setContentsMargins(10, 8, 10, 8)
        layout.setSpacing(6)
        self.state = text_label("", "muted", point_delta=-1, wrap=False)  # wrapped, it was cut to its first line
        who = text_label(f"RadFM \u00b7 {TASK_LABELS.get(task, task)}", "who", wrap=False)
        header = hrow(who, self.state, stretch_at=1)
        layout.addLayout(header)
        self.body = text_label(CURSOR, point_delta=0.5)
        layout.addWidget(self.body)
        self.thumb_grid = FlowGrid()
        self.thumbs = self.thumb_grid.grid
        layout.addWidget(self.thumb_grid)
        self.copy_button = QtWidgets.QPushButton("Copy answer")
        self.details_button = QtWidgets.QPushButton()
        for button in (self.copy_button, self.details_button):
            button.setObjectName("link")
            button.setCursor(QtCore.Qt.PointingHandCursor)
            button.setEnabled(False)
        self.details_button.setCheckable(True)
        self.attention_button = QtWidgets.QPushButton("Show attention")
        self.attention_button.setObjectName("link")
        self.attention_button.setCursor(QtCore.Qt.PointingHandCursor)
        self.attention_button.setToolTip("Overlay where the model looked on the scan (resampler attention, "
                                         "not an explanation)")
        self.attention_button.setVisible(False)
        layout.addLayout(hrow(self.copy_button, self.details_button, self.attention_button, stretch_at=3))
        self.details = text_label("", "details", point_delta=-1)
        self.details.setVisible(False)
        layout.addWidget(self.details)
        layout.addWidget(text_label(NOTICE, "notice", point_delta=-1.5))
        self.details_button.toggled.connect(self._show_details)
        self._show_details(False)
        self.copy_button.clicked.connect(self.copy)
        self.state.setText("writing\u2026")

    def _show_details(self, shown: bool):
        self.details.setVisible(shown)
        self.details_button.setText("What the model saw " + ("\u25be" if shown else "\u25b8"))

    def append(self, delta: str):
        self.text += delta
        self.body.setText(self.text + CURSOR)

    def finish(self, turn):
        """Show the recorded turn (a ``RadFMSlicer.session.Turn``): final text, images, provenance."""
        if turn.error:
            return self.fail(turn.error, turn.answer)
        self.text = turn.answer
        self.body.setText(turn.answer or "(no answer)")
        self.state.setText(ANSWER_NOTES.get(turn.stop_reason, ""))
        for image in turn.images:
            self._add_thumbnail(image)
        self.details.setText(describe_turn(turn))
        self.copy_button.setEnabled(bool(self.text))
        self.details_button.setEnabled(True)
        if self.show_attention and turn.provenance.get("attention"):
            self.attention_button.clicked.connect(lambda: self.show_attention(turn))
            self.attention_button.setVisible(True)

    def fail(self, message: str, partial: str = ""):
        self.text = partial
        self.body.setText(partial)
        self.body.setVisible(bool(partial))
        self.state.setText("no answer")
        error = text_label(f"The model could not answer: {message}", "error")
        self.frame.layout().insertWidget(2, error)
        self.copy_button.setEnabled(bool(partial))

    def copy(self):
        QtWidgets.QApplication.clipboard().setText(self.text)

    def _add_thumbnail(self, image):
        pixmap = QtGui.QPixmap(image.preview_png or "")
        if pixmap.isNull():
            return
        button = QtWidgets.QToolButton()
        button.setAutoRaise(True)
        button.setToolButtonStyle(QtCore.Qt.ToolButtonTextUnderIcon)
        resize_font(button, -1)  # a caption: a size smaller, like the other secondary text
        button.setIcon(QtGui.QIcon(pixmap))
        icon = pixmap.size().scaled(THUMB_PX * 2, THUMB_PX, QtCore.Qt.KeepAspectRatio)
        button.setIconSize(icon)
        # The label wraps to the picture's width: a full-width "CT chest 2024-03-01" made a row of three too wide.
        label = wrap_lines(image.label, QtGui.QFontMetrics(get(button, "font")), max(icon.width(), THUMB_PX))
        button.setText(f"{image.role}\n{label}" if image.role != image.label else label)
        button.setToolTip(f"{image.label} ({image.role})\n{image.source}\n"
                          f"Click to open the full-size picture of what the model saw.")
        button.clicked.connect(lambda: QtGui.QDesktopServices.openUrl(QtCore.QUrl.fromLocalFile(image.preview_png)))
        self.thumb_grid.add(button)


def describe_turn(turn) -> str:
    """The provenance block: each image as the model got it, the prompt, model and timing."""
    from RadFMSlicer.imaging import describe_window  # loaded with the session already

    lines = []
    for n, image in enumerate(turn.images, 1):
        lines.append(f"Image {n}: {image.label} ({image.role})")
        lines.append(f"   source {image.source}")
        window = describe_window(image.window) if image.window else "window unknown"
        lines.append(f"   {window}; resampled to {image.resample.get('size')} ({image.resample.get('interpolation')})")
        if image.crop_box:
            lines.append(f"   crop box {image.crop_box}")
        lines += [f"   {line}" for line in ([image.facts] if image.facts else []) + list(image.notes)]
    lines.append(f"Prompt: {turn.prompt}")
    for key, value in turn.provenance.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
        if value not in (None, ""):
            lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
    lines.append(f"Asked {turn.created}")
    return "\n".join(lines)
