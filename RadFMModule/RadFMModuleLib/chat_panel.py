"""The RadFM chat panel: pick the scan (and prior, regions, window), ask, watch the answer stream.

Slicer-free: it talks to an :class:`~RadFMModuleLib.assistant.Assistant` (scene + worker)
and runs under PythonQt inside Slicer or PySide6 outside (see ``qt_shim``). All model work
happens in the worker process; a QTimer on the GUI thread drains its events, so the viewer
never freezes. Every answer shows what the model saw and the research-use-only notice.
"""

import time

from .assistant import WINDOW_AS_SHOWN, ConnectJob, Note, Selection
from .qt_shim import QtCore, QtGui, QtWidgets, ask_existing_dir, ask_open_path, ask_save_path, get
from .settings import DEVICES, PRECISIONS, ModelSettings

TASK_BUTTONS = [("Draft report", "report"), ("Diagnosis and rationale", "rationale"), ("Modality", "modality")]
TASK_LABELS = {"vqa": "Question", "diagnosis": "Diagnosis", **{task: label for label, task in TASK_BUTTONS}}
WINDOWS = [("As shown in the viewer", WINDOW_AS_SHOWN), ("Automatic", None), ("Soft tissue", "soft_tissue"),
           ("Lung", "lung"), ("Bone", "bone"), ("Brain", "brain")]
KIND_LABELS = {"segment": "segment", "box": "ROI box", "line": "line"}
STOP_NOTES = {"length": "Stopped at the length limit.", "cancelled": "Stopped before the end."}
NOTICE = "Research use only. Not a medical device: check every statement against the images."
CURSOR = "\u258d"
TICK_MS = 50
RATE_AFTER_S = 4 * TICK_MS / 1000  # tokens arrive in batches, one per tick: a rate over fewer ticks is noise
THUMB_PX = 96


def _theme(palette) -> dict:
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


def _label(text="", name=None, rich=False, point_delta=0) -> QtWidgets.QLabel:
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


def _row(*widgets, stretch_at=None) -> QtWidgets.QHBoxLayout:
    row = QtWidgets.QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    for n, widget in enumerate(widgets):
        if n == stretch_at:
            row.addStretch(1)
        row.addWidget(widget)
    if stretch_at == len(widgets):
        row.addStretch(1)
    return row


class KeyGuard(QtCore.QObject):
    """Keeps typing away from Slicer's single-key viewer shortcuts; Enter sends, Shift+Enter breaks a line.

    Qt asks the focused widget first (ShortcutOverride); accepting every key without
    Ctrl/Alt/Meta makes it a keystroke for the text box instead of a shortcut.
    """

    COMMAND_KEYS = QtCore.Qt.ControlModifier | QtCore.Qt.AltModifier | QtCore.Qt.MetaModifier

    def __init__(self, parent, on_enter=None):
        super().__init__(parent)
        self.on_enter = on_enter

    def eventFilter(self, watched, event):
        kind = event.type()
        if kind == QtCore.QEvent.ShortcutOverride and not (event.modifiers() & self.COMMAND_KEYS):
            event.accept()
            return True
        if (self.on_enter and kind == QtCore.QEvent.KeyPress
                and event.key() in (QtCore.Qt.Key_Return, QtCore.Qt.Key_Enter)
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
        layout.addWidget(_label(f"You \u00b7 {TASK_LABELS.get(task, task)}", "who"))
        if question:
            layout.addWidget(_label(question, point_delta=0.5))
        if context:
            layout.addWidget(_label(context, "muted", point_delta=-1))


class AnswerView:
    """One answer: streams in, then shows thumbnails of what the model saw and its provenance."""

    def __init__(self, task: str):
        self.text = ""
        self.frame = QtWidgets.QFrame()
        self.frame.setObjectName("answerTurn")
        layout = QtWidgets.QVBoxLayout(self.frame)
        layout.setContentsMargins(10, 8, 10, 8)
        layout.setSpacing(6)
        self.state = _label("", "muted", point_delta=-1)
        who = _label(f"RadFM \u00b7 {TASK_LABELS.get(task, task)}", "who")
        who.setWordWrap(False)
        header = _row(who, self.state, stretch_at=1)
        layout.addLayout(header)
        self.body = _label(CURSOR, point_delta=0.5)
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
        layout.addLayout(_row(self.copy_button, self.details_button, stretch_at=2))
        self.details = _label("", "details", point_delta=-1)
        self.details.setVisible(False)
        layout.addWidget(self.details)
        layout.addWidget(_label(NOTICE, "notice", point_delta=-1.5))
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
        self.state.setText(STOP_NOTES.get(turn.stop_reason, ""))
        for image in turn.images:
            self._add_thumbnail(image)
        self.thumbs.addStretch(1)
        self.details.setText(describe_turn(turn))
        self.copy_button.setEnabled(bool(self.text))
        self.details_button.setEnabled(True)

    def fail(self, message: str, partial: str = ""):
        self.text = partial
        self.body.setText(partial)
        self.body.setVisible(bool(partial))
        self.state.setText("no answer")
        error = _label(f"The model could not answer: {message}", "error")
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
        button.setText(f"{image.role}: {image.label}" if image.role != image.label else image.label)
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


class ChatPanel(QtWidgets.QWidget):
    """The whole panel. ``before_connect`` (optional) runs on the GUI thread before the worker
    starts and returns False to abort (inside Slicer: the first-use dependency install)."""

    def __init__(self, assistant, settings_store, parent=None):
        super().__init__(parent)
        self.assistant = assistant
        self.store = settings_store
        self.assistant.settings = ModelSettings.load(settings_store)
        self.before_connect = None
        self._job = None  # a ConnectJob, then the worker request
        self._pending = None  # ask arguments waiting for the worker
        self._answer = None  # the AnswerView being written
        self.answers = []
        self._tokens = 0
        self._stopping = False
        self._started = 0.0
        self._closed = False
        self.setStyleSheet(STYLE.format(**_theme(get(self, "palette"))))
        self._build()
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._tick)
        self.refresh_scene()
        self.show_conversation(self.assistant.restore())

    # ------------------------------------------------------------------ layout
    def _build(self):
        root = QtWidgets.QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        root.setSpacing(8)

        study = Section("Study", expanded=True)
        form = QtWidgets.QFormLayout(study.body)
        form.setContentsMargins(4, 0, 0, 0)
        self.volume_box = QtWidgets.QComboBox()
        self.prior_box = QtWidgets.QComboBox()
        self.region_list = QtWidgets.QListWidget()
        self.region_list.setMaximumHeight(78)
        self.window_box = QtWidgets.QComboBox()
        for text, value in WINDOWS:
            self.window_box.addItem(text, value)
        self.history_edit = QtWidgets.QLineEdit()
        self.history_edit.setPlaceholderText("Age, sex, indication, e.g. 58 y, male, cough for 3 weeks")
        for label, widget in [("Scan", self.volume_box), ("Prior", self.prior_box), ("Regions", self.region_list),
                              ("Window", self.window_box), ("History", self.history_edit)]:
            form.addRow(label, widget)
        root.addWidget(study.widget)

        self.conversation = QtWidgets.QScrollArea()
        self.conversation.setObjectName("conversation")
        self.conversation.setWidgetResizable(True)
        self.conversation.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
        turns = QtWidgets.QWidget()
        turns.setObjectName("turns")
        self.turns_layout = QtWidgets.QVBoxLayout(turns)
        self.turns_layout.setContentsMargins(8, 8, 8, 8)
        self.turns_layout.setSpacing(10)
        self.empty_label = _label("Pick a scan, then draft a report or ask a question.", "empty")
        self.empty_label.setAlignment(QtCore.Qt.AlignCenter)
        self.turns_layout.addWidget(self.empty_label)
        self.turns_layout.addStretch(1)
        self.conversation.setWidget(turns)
        bar = self.conversation.verticalScrollBar()
        self._follow = True
        bar.valueChanged.connect(lambda value: setattr(self, "_follow", value >= get(bar, "maximum") - 8))
        bar.rangeChanged.connect(lambda low, high: bar.setValue(high) if self._follow else None)
        root.addWidget(self.conversation, 1)

        self.task_buttons = []
        tasks = QtWidgets.QHBoxLayout()
        for text, task in TASK_BUTTONS:
            button = QtWidgets.QPushButton(text)
            button.clicked.connect(lambda checked=False, task=task: self.ask(task))
            tasks.addWidget(button)
            self.task_buttons.append(button)
        root.addLayout(tasks)

        self.input = QtWidgets.QPlainTextEdit()
        self.input.setPlaceholderText("Ask about this scan. Enter sends, Shift+Enter starts a new line.")
        self.input.setTabChangesFocus(True)
        self.input.setFixedHeight(self.input.fontMetrics().lineSpacing() * 3 + 14)
        self.ask_button = QtWidgets.QPushButton("Ask")
        self.ask_button.setDefault(True)
        self.stop_button = QtWidgets.QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.ask_button.clicked.connect(lambda: self.ask("vqa"))
        self.stop_button.clicked.connect(self.stop)
        self.task_buttons.append(self.ask_button)
        buttons = QtWidgets.QVBoxLayout()
        buttons.addWidget(self.ask_button)
        buttons.addWidget(self.stop_button)
        buttons.addStretch(1)
        ask_row = QtWidgets.QHBoxLayout()
        ask_row.addWidget(self.input, 1)
        ask_row.addLayout(buttons)
        root.addLayout(ask_row)

        self.status_label = _label("", "status", point_delta=-1)
        self.busy = QtWidgets.QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setMaximumSize(72, 10)
        self.busy.setTextVisible(False)
        self.busy.setVisible(False)
        self.export_button = QtWidgets.QToolButton()
        self.export_button.setText("Export conversation")
        self.export_button.setPopupMode(QtWidgets.QToolButton.InstantPopup)
        menu = QtWidgets.QMenu(self.export_button)
        for text, fmt in (("As Markdown\u2026", "md"), ("As JSON\u2026", "json")):
            menu.addAction(text).triggered.connect(lambda checked=False, fmt=fmt: self._export_dialog(fmt))
        self.export_button.setMenu(menu)
        status_row = _row(self.busy, self.status_label, self.export_button)
        status_row.setStretch(1, 1)
        root.addLayout(status_row)

        root.addWidget(self._build_settings())
        self._guards = [KeyGuard(self, on_enter=lambda: self.ask("vqa"))]
        self.input.installEventFilter(self._guards[0])
        for edit in self.findChildren(QtWidgets.QLineEdit):
            guard = KeyGuard(self)
            edit.installEventFilter(guard)
            self._guards.append(guard)

    def _build_settings(self):
        settings = self.assistant.settings
        section = Section("Model settings", expanded=not settings.checkpoint_folder)
        form = QtWidgets.QFormLayout(section.body)
        form.setContentsMargins(4, 0, 0, 0)
        self.folder_edit = QtWidgets.QLineEdit(settings.checkpoint_folder)
        self.folder_edit.setPlaceholderText("Folder with pytorch_model.bin and Language_files/")
        self.device_box = QtWidgets.QComboBox()
        self.precision_box = QtWidgets.QComboBox()
        for box, options, value in [(self.device_box, DEVICES, settings.device),
                                    (self.precision_box, PRECISIONS, settings.precision)]:
            box.addItems(list(options) + ([] if value in options else [value]))
            box.setCurrentText(value)
        self.python_edit = QtWidgets.QLineEdit(settings.worker_python)
        self.python_edit.setPlaceholderText("Slicer's own Python (default)")
        browse_folder = QtWidgets.QToolButton()
        browse_folder.setText("\u2026")
        browse_folder.clicked.connect(lambda: self._browse(self.folder_edit, ask_existing_dir))
        browse_python = QtWidgets.QToolButton()
        browse_python.setText("\u2026")
        browse_python.clicked.connect(lambda: self._browse(self.python_edit, ask_open_path))
        form.addRow("Checkpoint", _row(self.folder_edit, browse_folder))
        form.addRow("Device", self.device_box)
        form.addRow("Precision", self.precision_box)
        form.addRow("Worker Python", _row(self.python_edit, browse_python))
        for edit in (self.folder_edit, self.python_edit):
            edit.textChanged.connect(self._save_settings)
        for box in (self.device_box, self.precision_box):
            box.currentIndexChanged.connect(self._save_settings)
        return section.widget

    def _browse(self, edit, ask):
        path = ask(self, "Choose", get(edit, "text"))
        if path:
            edit.setText(path)

    def _save_settings(self, *args):
        self.assistant.settings = ModelSettings(get(self.folder_edit, "text").strip(), get(self.device_box, "currentText"),
                                                get(self.precision_box, "currentText"),
                                                get(self.python_edit, "text").strip())
        self.assistant.settings.save(self.store)

    # ------------------------------------------------------------------ scene
    def refresh_scene(self):
        """Re-list volumes and regions (call when nodes are added or removed); keeps choices."""
        scene = self.assistant.scene
        volumes = scene.volumes()
        current = get(self.volume_box, "currentData") or scene.shown_volume_id()
        prior = get(self.prior_box, "currentData")
        checked = set(self.selection().region_ids)
        self.volume_box.clear()
        self.prior_box.clear()
        self.prior_box.addItem("None", None)
        for item in volumes:
            self.volume_box.addItem(item.name, item.id)
            self.prior_box.addItem(item.name, item.id)
        for box, value in ((self.volume_box, current), (self.prior_box, prior)):
            index = box.findData(value)
            box.setCurrentIndex(max(index, 0))
        self.region_list.clear()
        for item in scene.regions():
            detail = f", {item.detail}" if item.detail else ""
            entry = QtWidgets.QListWidgetItem(f"{item.name} ({KIND_LABELS.get(item.kind, item.kind)}{detail})")
            entry.setData(QtCore.Qt.UserRole, item.id)
            entry.setFlags(QtCore.Qt.ItemIsEnabled | QtCore.Qt.ItemIsUserCheckable)
            entry.setCheckState(QtCore.Qt.Checked if item.id in checked else QtCore.Qt.Unchecked)
            self.region_list.addItem(entry)
        if not self.region_list.count():
            self.region_list.addItem("No segments, ROI boxes or lines in the scene")

    def selection(self) -> Selection:
        return Selection(
            volume_id=get(self.volume_box, "currentData"),
            prior_id=get(self.prior_box, "currentData"),
            region_ids=tuple(e.data(QtCore.Qt.UserRole) for e in self._checked_regions()),
            window=get(self.window_box, "currentData"),
            history=get(self.history_edit, "text"),
        )

    def _checked_regions(self) -> list:
        entries = [self.region_list.item(n) for n in range(get(self.region_list, "count"))]
        return [e for e in entries if e.checkState() == QtCore.Qt.Checked]

    def _context(self, selection: Selection) -> str:
        names = [get(self.volume_box, "currentText")]
        if selection.prior_id:
            names.append(f"prior {get(self.prior_box, 'currentText')}")
        names += [e.text() for e in self._checked_regions()]
        names.append(f"window: {get(self.window_box, 'currentText').lower()}")
        if selection.history.strip():
            names.append(f"history: {selection.history.strip()}")
        return " \u00b7 ".join(names)

    # ------------------------------------------------------------------ asking
    @property
    def busy_now(self) -> bool:
        return self._job is not None

    def ask(self, task: str):
        """Send the typed question (task "vqa") or run a task button; ignored while busy."""
        if self.busy_now or self._closed:
            return
        question = self.input.toPlainText().strip()
        selection = self.selection()
        try:
            self._pending = self.assistant.build_ask(task, question, selection)
        except (ValueError, OSError) as exc:
            return self._set_status(str(exc))
        if self.before_connect and not self.before_connect():
            return self._set_status("RadFM cannot start until its Python packages are installed.")
        self.input.clear()
        self._add_turn_views(UserTurnView(task, question, self._context(selection)))
        self._answer = AnswerView(task)
        self._add_turn_views(self._answer)
        self._tokens = 0
        self._stopping = False
        self._set_busy(True)
        self._job = ConnectJob(self.assistant)
        self._timer.start()

    def stop(self):
        """Stop the answer being written (the words so far are kept)."""
        if isinstance(self._job, ConnectJob):
            self._job.cancel()
            self._close_turn({"stop_reason": "cancelled"}, "Stopped before the model was ready.")
        elif self._job is not None:
            self._job.cancel()
            self._stopping = True  # tokens already on their way still arrive: keep saying so
            self._set_status("Stopping\u2026")

    def _tick(self):
        try:
            events = self._job.poll() if self._job is not None else []
        except Exception as exc:  # the worker died between two polls
            events = [Note("error", str(exc) or type(exc).__name__)]
        for event in events:
            self._handle(event)
            if self._job is None:
                break
        if self._job is None:
            self._timer.stop()

    def _handle(self, event):
        if event.kind == "status":  # the worker's are bare phrases ("generating"): punctuate them like ours
            text = event.text[:1].upper() + event.text[1:]
            if not self._stopping:
                self._set_status(text if text.endswith("\u2026") else text + "\u2026")
        elif event.kind == "ready":
            self._job = self.assistant.client.ask(**self._pending)
            self._set_status("Reading the images\u2026")
        elif event.kind == "token":
            if not self._tokens:
                self._started = time.monotonic()
            self._tokens += 1
            self._answer.append(event.text)
            if not self._stopping:
                self._set_status(f"Writing\u2026 {self._tokens} token{'s' if self._tokens > 1 else ''}{self._rate()}")
        elif event.kind == "done":
            stop_reason = event.data.get("stop_reason", "")
            turn = event.data.get("turn") or {"stop_reason": stop_reason}  # no turn: cancelled before it began
            self._close_turn(turn, STOP_NOTES.get(stop_reason, "Answer complete."))
        elif event.kind == "error":
            self._close_turn({"stop_reason": "error", "error": event.text},
                             "The model could not answer; the conversation is kept. Ask again to restart the worker.")

    def _close_turn(self, turn: dict, status: str):
        """Record the turn (a worker turn, or what we know of a failed one) and show it."""
        known = {"task": self._pending["task"], "question": self._pending["question"], "answer": self._answer.text}
        self._answer.finish(self.assistant.record({**known, **turn}))
        self.answers.append(self._answer)
        self._job = self._pending = None
        self._set_busy(False)
        self._set_status(status)

    def _rate(self) -> str:
        """The status's tokens/s since the first token, once enough time has passed to mean something."""
        elapsed = time.monotonic() - self._started
        return f", {(self._tokens - 1) / elapsed:.1f} tokens/s" if elapsed >= RATE_AFTER_S else ""

    def _set_busy(self, busy: bool):
        for button in self.task_buttons:
            button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.busy.setVisible(busy)

    def _set_status(self, text: str):
        self.status_label.setText(text)

    # ------------------------------------------------------------------ conversation
    def _add_turn_views(self, view):
        self.empty_label.setVisible(False)
        self._follow = True
        self.turns_layout.insertWidget(self.turns_layout.count() - 1, view.frame)

    def show_conversation(self, turns):
        """Show saved turns (e.g. restored from the scene), replacing what is shown."""
        while self.turns_layout.count() > 2:
            item = self.turns_layout.takeAt(1)
            item.widget().deleteLater()
        self.answers = []
        self.empty_label.setVisible(not turns)
        for turn in turns:
            context = ", ".join(f"{image.label} ({image.role})" for image in turn.images)
            self._add_turn_views(UserTurnView(turn.task, turn.question, context))
            view = AnswerView(turn.task)
            view.finish(turn)
            self._add_turn_views(view)
            self.answers.append(view)

    def reload(self):
        """After the scene was closed or loaded: cancel, then show the scene's conversation."""
        self.cancel_quietly()
        self.refresh_scene()
        self.show_conversation(self.assistant.restore())
        self._set_status("")

    def copy_answer(self, index: int = -1):
        answered = [view for view in self.answers if view.text]
        if answered:
            answered[index].copy()

    def export(self, path: str, fmt: str):
        """Write the conversation as Markdown ("md") or JSON ("json")."""
        session = self.assistant.session
        text = session.to_markdown() if fmt == "md" else session.to_json()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        self._set_status(f"Conversation saved to {path}")

    def _export_dialog(self, fmt: str):
        name = "Markdown (*.md)" if fmt == "md" else "JSON (*.json)"
        path = ask_save_path(self, "Export conversation", name)
        if path:
            self.export(path, fmt)

    # ------------------------------------------------------------------ closing
    def cancel_quietly(self):
        """Cancel whatever runs without recording a turn (scene closing, panel closing)."""
        if self._job is not None:
            self._job.cancel()
        self._job = self._pending = None
        self._timer.stop()
        self._set_busy(False)

    def shutdown(self):
        """Cancel, stop the worker and remove temporary files. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.cancel_quietly()
            self.assistant.close()

    def closeEvent(self, event):
        self.shutdown()
        super().closeEvent(event)
