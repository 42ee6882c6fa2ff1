"""The RadFM chat panel: pick the scan (and prior, regions, window), ask, watch the answer stream.

Slicer-free: it talks to an :class:`~RadFMModuleLib.assistant.Assistant` (scene + worker)
and runs under PythonQt inside Slicer or PySide6 outside (see ``qt_shim``). All model work
happens in the worker process; a QTimer on the GUI thread drains its events, so the viewer
never freezes. Every answer shows what the model saw and the research-use-only notice.
"""

import os
import queue
import time

from RadFMSlicer import storage
from RadFMSlicer.errors import RadFMError

from .assistant import WINDOW_AS_SHOWN, ConnectJob, Note, Selection
from .qt_shim import (QtCore, QtGui, QtWidgets, ask_edited_text, ask_existing_dir, ask_open_path, ask_save_path,
                      get)
from .settings import DEVICES, PRECISIONS, RUN_ON, ModelSettings, save_token
from .turn_views import (STOP_NOTES, STYLE, TASK_LABELS, AnswerView, EnterSends, FlowGrid, Section, UserTurnView,
                         hrow, text_label, theme_colors)

TASK_BUTTONS = [(TASK_LABELS[task], task) for task in ("report", "rationale", "modality")]
WINDOWS = [("As shown in the viewer", WINDOW_AS_SHOWN), ("Automatic", None), ("Soft tissue", "soft_tissue"),
           ("Lung", "lung"), ("Bone", "bone"), ("Brain", "brain")]
KIND_LABELS = {"segment": "segment", "box": "ROI box", "line": "line"}
INPUT_ERRORS = ("PromptError", "ImageError", "RequestError")  # the worker refused the question itself: say why
TICK_MS = 50
RATE_AFTER_S = 4 * TICK_MS / 1000  # tokens arrive in batches, one per tick: a rate over fewer ticks is noise
LOG_MS = 250  # the log pane drains worker lines this often, busy or not (a crash while idle is logged too)
LOG_LINES = 2000
AHEAD_MS = 400  # the scan is prepared ahead once the choice has settled (a refresh re-fills the boxes)

# What the panel is doing; every button and status follows from it.
IDLE, CONNECTING, GENERATING, STOPPING = "idle", "connecting", "generating", "stopping"
INSTALLING = "installing"  # before_connect runs (Slicer's install dialogs and pip process Qt events)


def show_hint(edit, text: str):
    """An empty box's hint, also as its tooltip: Qt cuts a hint longer than a narrow box short."""
    edit.setPlaceholderText(text)
    edit.setToolTip(text)


def name_box() -> QtWidgets.QComboBox:
    """A box of the scene's scans: as wide as the panel lets it be, not as its longest name (a long
    DICOM series name made the panel wider than Slicer's side panel); the chosen name is its tooltip."""
    box = QtWidgets.QComboBox()
    box.setSizeAdjustPolicy(QtWidgets.QComboBox.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(12)
    box.currentIndexChanged.connect(lambda *args: box.setToolTip(get(box, "currentText")))
    return box


class ChatPanel(QtWidgets.QWidget):
    """The whole panel. ``before_connect`` (optional) runs on the GUI thread before the worker
    starts and returns False to abort (inside Slicer: the first-use dependency install)."""

    def __init__(self, assistant, settings_store, parent=None):
        super().__init__(parent)
        self.assistant = assistant
        self.store = settings_store
        self.assistant.settings = ModelSettings.load(settings_store)
        self.before_connect = None
        self.state = IDLE
        self._job = None  # CONNECTING: a ConnectJob; GENERATING and STOPPING: the worker request
        self._pending = None  # ask arguments waiting for the worker
        self._answer = None  # the AnswerView being written
        self.answers = []
        self._tokens = 0
        self._started = 0.0
        self._closed = False
        self._worker_lines = queue.Queue()  # filled by the worker client's stderr thread, drained on the GUI thread
        self.assistant.on_worker_line = self._worker_lines.put
        self.setStyleSheet(STYLE.format(**theme_colors(get(self, "palette"))))
        self._build()
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._tick)
        self._log_timer = QtCore.QTimer(self)
        self._log_timer.setInterval(LOG_MS)
        self._log_timer.timeout.connect(self._drain_worker_lines)
        self._log_timer.start()
        self._ahead_timer = QtCore.QTimer(self)
        self._ahead_timer.setSingleShot(True)
        self._ahead_timer.setInterval(AHEAD_MS)
        self._ahead_timer.timeout.connect(self._prepare_ahead)
        for box in (self.volume_box, self.prior_box, self.window_box):
            box.currentIndexChanged.connect(lambda *args: self._ahead_timer.start())
        self.refresh_scene()
        self.show_conversation(self.assistant.restore())
        self._set_status(self.assistant.restore_note or self._list_conversations())

    # ------------------------------------------------------------------ layout
    def _build(self):
        root = QtWidgets.QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        root.setSpacing(8)

        study = Section("Study", expanded=True)
        form = QtWidgets.QFormLayout(study.body)
        form.setContentsMargins(4, 0, 0, 0)
        self.volume_box = name_box()
        self.prior_box = name_box()
        self.region_list = QtWidgets.QListWidget()
        self.region_list.setMaximumHeight(78)
        self.window_box = QtWidgets.QComboBox()
        for text, value in WINDOWS:
            self.window_box.addItem(text, value)
        self.history_edit = QtWidgets.QLineEdit()
        show_hint(self.history_edit, "Age, sex, indication, e.g. 58 y, male, cough for 3 weeks")
        self.attention_box = QtWidgets.QCheckBox("Show where the model looked")
        self.attention_box.setToolTip("Also compute the resampler's attention map with the answer (resampler "
                                      "attention, not an explanation); \u201cShow attention\u201d under the "
                                      "answer overlays it on the scan.")
        for label, widget in [("Scan", self.volume_box), ("Prior", self.prior_box), ("Regions", self.region_list),
                              ("Window", self.window_box), ("History", self.history_edit), ("", self.attention_box)]:
            form.addRow(label, widget)
            if widget is self.volume_box:  # why a volume in the scene is not in the list (a colour volume...)
                self.skipped_label = text_label("", "muted", point_delta=-1)
                self.skipped_label.setVisible(False)
                form.addRow("", self.skipped_label)
        root.addWidget(study.widget)

        # A scene holding several conversations (a saved study added to it brings its own): which one is shown
        self.conversation_box = QtWidgets.QComboBox()
        self.conversation_box.activated.connect(lambda *args: self._open_conversation())  # PythonQt: (int) or (str)
        self.conversations_row = QtWidgets.QWidget()
        self.conversations_row.setLayout(hrow(QtWidgets.QLabel("Conversation"), self.conversation_box, stretch_at=2))
        self.conversations_row.setVisible(False)
        root.addWidget(self.conversations_row)

        self.conversation = QtWidgets.QScrollArea()
        self.conversation.setObjectName("conversation")
        self.conversation.setWidgetResizable(True)
        self.conversation.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
        turns = QtWidgets.QWidget()
        turns.setObjectName("turns")
        self.turns_layout = QtWidgets.QVBoxLayout(turns)
        self.turns_layout.setContentsMargins(8, 8, 8, 8)
        self.turns_layout.setSpacing(10)
        self.empty_label = text_label("Pick a scan, then draft a report or ask a question.", "empty")
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
        tasks = FlowGrid(fill=True)  # one row where the panel is wide enough, two where not
        for text, task in TASK_BUTTONS:
            button = QtWidgets.QPushButton(text)
            button.clicked.connect(lambda checked=False, task=task: self.ask(task))
            tasks.add(button)
            self.task_buttons.append(button)
        root.addWidget(tasks)

        self.input = QtWidgets.QPlainTextEdit()
        self.input.setPlaceholderText("Ask about this scan. Enter sends, Shift+Enter starts a new line.")
        self.input.setTabChangesFocus(True)
        self.input.setFixedHeight(QtGui.QFontMetrics(get(self.input, "font")).lineSpacing() * 3 + 14)
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

        # The status has a row of its own, the panel's full width, and wraps: it says what failed and
        # what to do, so it must read in full (beside the buttons it was cut, wrapped or not).
        self.status_label = text_label("", "status", point_delta=-1)
        root.addWidget(self.status_label)
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
        menu.addAction("Last answer as DICOM SR\u2026").triggered.connect(lambda checked=False: self._export_sr_dialog())
        self.export_button.setMenu(menu)
        self.offer_button = QtWidgets.QPushButton()  # the GPU check's offer: a precision that fits
        self.offer_button.setVisible(False)
        self.offer_button.clicked.connect(self._take_offer)
        root.addLayout(hrow(self.busy, self.offer_button, self.export_button, stretch_at=2))

        root.addWidget(self._build_settings())
        root.addWidget(self._build_log())
        self.enter_sends = EnterSends(self, on_enter=lambda: self.ask("vqa"))
        self.input.installEventFilter(self.enter_sends)

    def _build_settings(self):
        settings = self.assistant.settings
        section = Section("Model settings", expanded=not settings.checkpoint_folder)
        form = QtWidgets.QFormLayout(section.body)
        form.setContentsMargins(4, 0, 0, 0)
        self.folder_edit = QtWidgets.QLineEdit(settings.checkpoint_folder)
        show_hint(self.folder_edit, "Folder with pytorch_model.bin and Language_files/")
        self.device_box = QtWidgets.QComboBox()
        self.precision_box = QtWidgets.QComboBox()
        for box, options, value in [(self.device_box, DEVICES, settings.device),
                                    (self.precision_box, PRECISIONS, settings.precision)]:
            box.addItems(list(options) + ([] if value in options else [value]))
            box.setCurrentText(value)
        self.python_edit = QtWidgets.QLineEdit(settings.worker_python)
        show_hint(self.python_edit, "Slicer's own Python (default)")
        browse_folder = QtWidgets.QToolButton()
        browse_folder.setText("\u2026")
        browse_folder.clicked.connect(lambda: self._browse(self.folder_edit, ask_existing_dir))
        browse_python = QtWidgets.QToolButton()
        browse_python.setText("\u2026")
        browse_python.clicked.connect(lambda: self._browse(self.python_edit, ask_open_path))
        form.addRow("Checkpoint", hrow(self.folder_edit, browse_folder))
        form.addRow("Device", self.device_box)
        form.addRow("Precision", self.precision_box)
        form.addRow("Worker Python", hrow(self.python_edit, browse_python))
        self.run_on_box = QtWidgets.QComboBox()
        self.run_on_box.addItems(list(RUN_ON))
        self.run_on_box.setCurrentText(settings.run_on)
        self.server_edit = QtWidgets.QLineEdit(settings.server_url)
        show_hint(self.server_edit, "https://radfm-server:8765 (radfm serve)")
        self.token_edit = QtWidgets.QLineEdit()  # never filled in: a saved token is not shown again
        self.token_edit.setEchoMode(QtWidgets.QLineEdit.Password)
        show_hint(self.token_edit, "Server token (kept in the system keyring)")
        self.token_edit.editingFinished.connect(self._save_token)
        form.addRow("Run on", self.run_on_box)
        form.addRow("Server", self.server_edit)
        form.addRow("Token", self.token_edit)
        self.server_edit.textChanged.connect(self._save_settings)
        self.run_on_box.currentIndexChanged.connect(self._save_settings)
        for edit in (self.folder_edit, self.python_edit):
            edit.textChanged.connect(self._save_settings)
        for box in (self.device_box, self.precision_box):
            box.currentIndexChanged.connect(self._save_settings)
        self.settings_section = section
        return section.widget

    def _build_log(self):
        section = Section("Log", expanded=False)
        layout = QtWidgets.QVBoxLayout(section.body)
        layout.setContentsMargins(4, 0, 0, 0)
        self.log_view = QtWidgets.QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(LOG_LINES)
        self.log_view.setLineWrapMode(QtWidgets.QPlainTextEdit.NoWrap)
        self.log_view.setFixedHeight(QtGui.QFontMetrics(get(self.log_view, "font")).lineSpacing() * 8 + 10)
        self.log_view.setPlaceholderText("Worker messages and package installs appear here.")
        layout.addWidget(self.log_view)
        self.log_section = section
        return section.widget

    def log(self, text: str):
        """Add lines to the log pane (worker stderr, connection steps, install output). GUI thread only."""
        for line in str(text).rstrip("\n").splitlines() or [""]:
            self.log_view.appendPlainText(line)

    def _drain_worker_lines(self):
        lines = []
        while not self._worker_lines.empty():
            lines.append(self._worker_lines.get_nowait())
        if lines:
            self.log("\n".join(lines))

    def _browse(self, edit, ask):
        path = ask(self, "Choose", get(edit, "text"))
        if path:
            edit.setText(path)

    def _save_settings(self, *args):
        self.assistant.settings = ModelSettings(get(self.folder_edit, "text").strip(), get(self.device_box, "currentText"),
                                                get(self.precision_box, "currentText"),
                                                get(self.python_edit, "text").strip(),
                                                run_on=get(self.run_on_box, "currentText"),
                                                server_url=get(self.server_edit, "text").strip())
        self.assistant.settings.save(self.store)

    def _save_token(self):
        token = get(self.token_edit, "text").strip()
        if not token:
            return
        kept = save_token(self.assistant.settings.server_url, token)
        self.token_edit.clear()
        show_hint(self.token_edit, "Token saved in the system keyring" if kept
                  else "Token kept until Slicer closes (no keyring on this computer)")

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
            if item.kind == "volume":
                self.volume_box.addItem(item.name, item.id)
                self.prior_box.addItem(item.name, item.id)
        skipped = [f"{item.name} \u2014 {item.detail}" for item in volumes if item.kind != "volume"]
        self.skipped_label.setText("Not offered: " + "; ".join(skipped) if skipped else "")
        self.skipped_label.setVisible(bool(skipped))
        for box, value in ((self.volume_box, current), (self.prior_box, prior)):
            index = box.findData(value)
            box.setCurrentIndex(max(index, 0))
        self.region_list.clear()
        for item in scene.regions():
            detail = f", {item.detail}" if item.detail else ""
            entry = QtWidgets.QListWidgetItem(f"{item.name} ({KIND_LABELS.get(item.kind, item.kind)}{detail})")
            entry.setToolTip(entry.text())
            entry.setData(QtCore.Qt.UserRole, item.id)
            entry.setFlags(QtCore.Qt.ItemIsEnabled | QtCore.Qt.ItemIsUserCheckable)
            entry.setCheckState(QtCore.Qt.Checked if item.id in checked else QtCore.Qt.Unchecked)
            self.region_list.addItem(entry)
        if not get(self.region_list, "count"):
            self.region_list.addItem("No segments, ROI boxes or lines in the scene")

    def selection(self) -> Selection:
        return Selection(
            volume_id=get(self.volume_box, "currentData"),
            prior_id=get(self.prior_box, "currentData"),
            region_ids=tuple(e.data(QtCore.Qt.UserRole) for e in self._checked_regions()),
            window=get(self.window_box, "currentData"),
            history=get(self.history_edit, "text"),
            attention=bool(get(self.attention_box, "checked")),
        )

    def select(self, selection: Selection):
        """Show a kept selection (scan, prior, regions, window) as far as the scene still has its items."""
        for box, value in ((self.volume_box, selection.volume_id), (self.prior_box, selection.prior_id),
                           (self.window_box, selection.window)):
            for n in range(get(box, "count")):
                if box.itemData(n) == value:
                    box.setCurrentIndex(n)
                    break
        for n in range(get(self.region_list, "count")):
            entry = self.region_list.item(n)
            if entry.flags() & QtCore.Qt.ItemIsUserCheckable:
                wanted = entry.data(QtCore.Qt.UserRole) in selection.region_ids
                entry.setCheckState(QtCore.Qt.Checked if wanted else QtCore.Qt.Unchecked)

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

    def _prepare_ahead(self):
        """While idle, have a running model read and encode the chosen scan before the question comes."""
        if self.busy_now or self._closed:
            return
        try:
            self.assistant.prepare_ahead(self.selection())
        except (ValueError, OSError) as exc:  # the scan is gone or cannot be handed over: the question will say
            self.log(f"Could not prepare the scan ahead: {exc}")

    # ------------------------------------------------------------------ asking
    @property
    def busy_now(self) -> bool:
        return self.state != IDLE

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
        if self.before_connect:
            self._set_state(INSTALLING)  # busy first: a click or Enter during the install must not start another
            try:
                ready = self.before_connect()
            finally:
                self._set_state(IDLE)
            if self._closed:
                return
            if not ready:
                return self._set_status("RadFM cannot start until its Python packages are installed.")
        self.input.clear()
        self._add_turn_views(UserTurnView(task, question, self._context(selection)))
        self._answer = AnswerView(task, self.show_attention)
        self._add_turn_views(self._answer)
        self._tokens = 0
        self._job = ConnectJob(self.assistant)
        self._set_state(CONNECTING)
        self._timer.start()

    def stop(self):
        """Stop the answer being written (the words so far are kept)."""
        if self.state == CONNECTING:
            self._job.cancel()
            self._close_turn({"stop_reason": "cancelled"}, "Stopped before the model was ready.")
        elif self.state == GENERATING:
            self._job.cancel()
            self._set_state(STOPPING)  # tokens already on their way still arrive: keep saying "Stopping"
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
            self.log(event.text)
            if self.state != STOPPING:
                self._set_status(text if text.endswith("\u2026") else text + "\u2026")
        elif event.kind == "ready":
            self._job = self.assistant.client.ask(**self._pending)
            self._set_state(GENERATING)
            self._set_status("Reading the images\u2026")
        elif event.kind == "token":
            if not self._tokens:
                self._started = time.monotonic()
            self._tokens += 1
            self._answer.append(event.text)
            if self.state != STOPPING:
                self._set_status(f"Writing\u2026 {self._tokens} token{'s' if self._tokens > 1 else ''}{self._rate()}")
        elif event.kind == "done":
            stop_reason = event.data.get("stop_reason", "")
            turn = event.data.get("turn") or {"stop_reason": stop_reason}  # no turn: cancelled before it began
            self._close_turn(turn, STOP_NOTES.get(stop_reason, "Answer complete."))
        elif event.kind == "error":
            self.log(f"Error: {event.text}")
            fits = (event.data or {}).get("precision")
            refused = (event.data or {}).get("kind") in INPUT_ERRORS
            self._close_turn({"stop_reason": "error", "error": event.text},
                             f"The chosen precision does not fit this GPU; {fits} does." if fits else
                             event.text[:1].upper() + event.text[1:] + "." if refused else
                             "The model could not answer; the conversation is kept. Ask again to restart the worker.")
            if fits:
                self._offered = fits
                self.offer_button.setText(f"Use {fits}")
                self.offer_button.setVisible(True)

    def _take_offer(self):
        self.precision_box.setCurrentText(self._offered)  # saved with the other settings
        self.offer_button.setVisible(False)
        self._set_status(f"Precision set to {self._offered}: ask again.")

    def _close_turn(self, turn: dict, status: str):
        """Record the turn (a worker turn, or what we know of a failed one) and show it.

        The panel is idle again before recording: a turn that cannot be saved is shown as
        failed, never leaves the panel busy.
        """
        view, pending = self._answer, self._pending
        self._job = self._pending = None
        self._set_state(IDLE)
        self._ahead_timer.start()  # a scan chosen while the answer was written
        self.answers.append(view)
        known = {"task": pending["task"], "question": pending["question"], "answer": view.text}
        try:
            view.finish(self.assistant.record({**known, **turn}))
        except Exception as exc:  # the GUI boundary: say what failed, keep the words and the panel usable
            message = f"the answer could not be recorded ({type(exc).__name__}: {exc})"
            self.log(f"Error: {message}")
            view.fail(message, view.text)
            status = "The answer could not be saved in the scene; see the log."
        self._set_status(status)

    def _rate(self) -> str:
        """The status's tokens/s since the first token, once enough time has passed to mean something."""
        elapsed = time.monotonic() - self._started
        return f", {(self._tokens - 1) / elapsed:.1f} tokens/s" if elapsed >= RATE_AFTER_S else ""

    def _set_state(self, state: str):
        self.state = state
        for button in self.task_buttons:
            button.setEnabled(state == IDLE)
        self.stop_button.setEnabled(state in (CONNECTING, GENERATING))
        self.busy.setVisible(state != IDLE)

    def _set_status(self, text: str, tooltip: str = ""):
        self.status_label.setText(text)
        self.status_label.setToolTip(tooltip or text)

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
            view = AnswerView(turn.task, self.show_attention)
            view.finish(turn)
            self._add_turn_views(view)
            self.answers.append(view)

    def show_attention(self, turn):
        """An answer's "Show attention": its map over the scan in the slice views."""
        try:
            name = self.assistant.show_attention(turn)
        except (ValueError, OSError, RuntimeError) as exc:  # gone, or the scan changed since
            return self._set_status(str(exc))
        self._set_status(f"Showing {name}")

    def reload(self):
        """After the scene was closed or loaded: cancel, then show the scene's conversation."""
        self.cancel_quietly()
        self.refresh_scene()
        self.show_conversation(self.assistant.restore())
        self._set_status(self.assistant.restore_note or self._list_conversations())

    def _list_conversations(self) -> str:
        """List the scene's conversations when it holds several; returns the line saying which one is shown."""
        scene = self.assistant.scene
        items = scene.conversations()
        self.conversation_box.clear()
        for item in items:
            self.conversation_box.addItem(f"{item.name} ({item.detail})", item.id)
        self.conversation_box.setCurrentIndex(max(self.conversation_box.findData(scene.conversation_id), 0))
        self.conversations_row.setVisible(len(items) > 1)
        if len(items) < 2:
            return ""
        return (f"This scene holds {len(items)} conversations; showing "
                f"\u201c{get(self.conversation_box, 'currentText')}\u201d. Pick another under Conversation.")

    def _open_conversation(self):
        """Show (and add to) the conversation picked in the list."""
        node_id = get(self.conversation_box, "currentData")
        if node_id == self.assistant.scene.conversation_id:
            return
        if self.busy_now:
            self.conversation_box.setCurrentIndex(self.conversation_box.findData(self.assistant.scene.conversation_id))
            return self._set_status("Wait for the answer (or stop it) before opening another conversation.")
        self.assistant.scene.conversation_id = node_id
        self.reload()

    def copy_answer(self, index: int = -1):
        answered = [view for view in self.answers if view.text]
        if answered:
            answered[index].copy()

    def export(self, path: str, fmt: str):
        """Write the conversation as Markdown ("md") or JSON ("json")."""
        session = self.assistant.session
        text = session.to_markdown() if fmt == "md" else session.to_json()
        try:
            storage.write_text(path, text)  # atomic: a failed save keeps the previous file
        except storage.StorageError as exc:
            self._set_status(str(exc))
            return
        self._set_status(f"Conversation saved as {os.path.basename(path)}", tooltip=path)

    def _export_dialog(self, fmt: str):
        name = "Markdown (*.md)" if fmt == "md" else "JSON (*.json)"
        path = ask_save_path(self, "Export conversation", name)
        if path:
            self.export(path, fmt)

    def export_sr(self, path: str, text: "str | None" = None):
        """The last answer as a DICOM SR (``text``: the reader's edit of it); see ``Assistant.export_sr``."""
        try:
            self._set_status(self.assistant.export_sr(path, text), tooltip=path)
        except (RadFMError, ValueError, OSError) as exc:
            self._set_status(str(exc))

    def _export_sr_dialog(self):
        turn = self.assistant.last_answer()
        if turn is None:
            return self._set_status("No answer to export yet: ask first.")
        text = ask_edited_text(self, "Export as DICOM SR", "Edit the draft; the report says what the reader changed "
                               "and stays unverified:", turn.text)
        path = ask_save_path(self, "Export as DICOM SR", "DICOM (*.dcm)") if text is not None else None
        if path:
            self.export_sr(path, text)

    # ------------------------------------------------------------------ closing
    def cancel_quietly(self):
        """Cancel whatever runs without recording a turn (scene closing, panel closing)."""
        if self._job is not None:
            self._job.cancel()
        self._job = self._pending = None
        self._timer.stop()
        self._set_state(IDLE)

    def shutdown(self):
        """Cancel, stop the worker and remove temporary files. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._ahead_timer.stop()
            self.cancel_quietly()
            self.assistant.close()

    def closeEvent(self, event):
        """Closing the panel ends its worker. No super() call: PythonQt has no Python-visible base method."""
        self.shutdown()
        self._log_timer.stop()
        event.accept()
