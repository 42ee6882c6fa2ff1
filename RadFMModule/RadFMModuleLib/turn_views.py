"""The conversation's building blocks: one user turn, one streaming answer, foldable sections.

Plain widgets with no panel state, so ``chat_panel.ChatPanel`` reads as the flow of a
conversation. Everything here runs under PythonQt (Slicer) and PySide6 alike: Qt
properties are read through ``qt_shim.get`` and no ``QKeyEvent`` method is called on an
event PythonQt hands over as a plain ``QEvent``.
"""

from .qt_shim import QtCore, QtGui, QtWidgets, get

TASK_LABELS = {"vqa": "Question", "diagnosis": "Diagnosis", "report": "Draft report",
               "rationale": "Diagnosis and rationale", "modality": "Modality"}
STOP_NOTES = {"length": "Stopped at the length limit.", "cancelled": "Stopped before the end."}  # status line
ANSWER_NOTES = {"length": "length limit", "cancelled": "stopped"}  # an answer's header: short, beside its title
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


def text_label(text="", name=None, rich=False, point_delta=0) -> QtWidgets.QLabel:
    label = QtWidgets.QLabel(text)
    label.setWordWrap(True)
    label.setTextFormat(QtCore.Qt.RichText if rich else QtCore.Qt.PlainText)
    label.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
    if name:
        label.setObjectName(name)
    if point_delta:
        font = get(label, "font")
        font.setPointSizeF(font.pointSizeF() + point_delta)
        label.setFont(font)
    return label


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
        self.state = text_label("", "muted", point_delta=-1)
        self.state.setWordWrap(False)  # a wrapped note in the header row was cut to its first line
        who = text_label(f"RadFM \u00b7 {TASK_LABELS.get(task, task)}", "who")
        who.setWordWrap(False)
        header = hrow(who, self.state, stretch_at=1)
        layout.addLayout(header)
        self.body = text_label(CURSOR, point_delta=0.5)
        layout.addWidget(self.body)
        self.thumbs = QtWidgets.QHBoxLayout()
        self.thumbs.setSpacing(6)
        layout.addLayout(self.thumbs)
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
        self.thumbs.addStretch(1)
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
        button.setIcon(QtGui.QIcon(pixmap))
        button.setIconSize(pixmap.size().scaled(THUMB_PX * 2, THUMB_PX, QtCore.Qt.KeepAspectRatio))
        button.setText(f"{image.role}\n{image.label}" if image.role != image.label else image.label)
        button.setToolTip(f"{image.source}\nClick to open the full-size picture of what the model saw.")
        button.clicked.connect(lambda: QtGui.QDesktopServices.openUrl(QtCore.QUrl.fromLocalFile(image.preview_png)))
        self.thumbs.addWidget(button)


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
