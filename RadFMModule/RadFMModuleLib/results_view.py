"""The Results tab: an evaluation run's cases, worst first, to open in the scene and probe live.

Slicer-free like the chat panel (Qt through ``qt_shim``): it reads a run folder made by
``radfm eval`` (``cases.jsonl``, ``summary.json``, the preview montages), lists every case
with its score, task, answer and reference, failures and lowest scores first. A double
click loads the case's scan into the scene through the ``Scene`` interface and shows the
answer, the reference and the thumbnails of what the model received; *Ask again* hands
the case to the owner (the module widget asks it in the chat panel with the current
settings), so a failure can be probed on the spot.
"""

from pathlib import Path

from RadFMSlicer.errors import RadFMError
from RadFMSlicer.evaluation.metrics import case_score
from RadFMSlicer.evaluation.records import read_cases, read_summary

from .qt_shim import QtCore, QtGui, QtWidgets, ask_existing_dir

COLUMNS = ("Score", "Task", "Case", "Answer", "Reference")
THUMB_WIDTH = 360
TEXT_WIDTH = 320  # px of the answer and reference columns


def worst_first(records: list[dict]) -> list[dict]:
    """Failed cases first (they have no score), then by score (accuracy, else ROUGE-L), lowest first."""
    def key(record):
        score = case_score(record.get("scores"))
        return (0, 0.0) if "answer" not in record else (1, score if score is not None else 0.0)
    return sorted(records, key=key)


class ResultsView(QtWidgets.QWidget):
    """Open a run, pick a case, see it in the scene. ``ask_again(volume_id, case)`` is set by the owner."""

    def __init__(self, scene, parent=None):
        super().__init__(parent)
        self.scene = scene
        self.ask_again = None  # callback (volume_id, case record): PythonQt cannot declare signals
        self.folder = None
        self.records: list[dict] = []
        self.current = None  # (volume id, case record) of the case shown
        layout = QtWidgets.QVBoxLayout(self)
        row = QtWidgets.QHBoxLayout()
        self.open_button = QtWidgets.QPushButton("Open run folder...")
        self.open_button.setToolTip("A folder written by 'radfm eval' (cases.jsonl, summary.json)")
        self.open_button.clicked.connect(lambda: self.choose())
        row.addWidget(self.open_button)
        self.summary_label = QtWidgets.QLabel("No run open.")
        self.summary_label.setWordWrap(True)
        row.addWidget(self.summary_label, 1)
        layout.addLayout(row)
        self.table = QtWidgets.QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectRows)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.cellDoubleClicked.connect(lambda row, column: self.show_case(row))
        layout.addWidget(self.table, 1)
        self.detail = QtWidgets.QLabel("Double-click a case to load its scan and see what the model received.")
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
        layout.addWidget(self.detail)
        self.thumbnail = QtWidgets.QLabel()
        layout.addWidget(self.thumbnail)
        self.ask_button = QtWidgets.QPushButton("Ask again")
        self.ask_button.setToolTip("Ask this case's question about the loaded scan with the current settings")
        self.ask_button.setEnabled(False)
        self.ask_button.clicked.connect(lambda: self._ask_again())
        layout.addWidget(self.ask_button)

    def choose(self):
        folder = ask_existing_dir(self, "Open an evaluation run", str(self.folder or ""))
        if folder:
            self.open(folder)

    def open(self, folder) -> None:
        """Show a run folder's cases, worst first (a folder that is not a run says so in the panel; a
        damaged ``summary.json`` is named beside the cases, which come from ``cases.jsonl`` alone)."""
        try:
            self.records = worst_first(read_cases(folder))
        except RadFMError as exc:
            self.summary_label.setText(str(exc))
            return
        try:
            note = read_summary(folder).get("note") or ""
        except RadFMError as exc:
            note = str(exc)
        self.folder = Path(folder)
        failed = sum("answer" not in record for record in self.records)
        counts = f"{self.folder.name}: {len(self.records)} cases, {failed} failed; worst first."
        self.summary_label.setText(f"{counts} {note}".strip())
        self.table.setRowCount(len(self.records))
        for row, record in enumerate(self.records):
            score = case_score(record.get("scores"))
            cells = ("failed" if "answer" not in record else f"{score:.1f}", record.get("task", ""), record["id"],
                     record.get("answer", record.get("error", "")), record.get("reference", ""))
            for column, text in enumerate(cells):
                item = QtWidgets.QTableWidgetItem(" ".join(str(text).split())[:200])
                item.setToolTip(str(text))
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        for column in (3, 4):  # answer and reference: a readable width, the whole text in the tooltip
            self.table.setColumnWidth(column, min(self.table.columnWidth(column), TEXT_WIDTH))
        self.current = None
        self.ask_button.setEnabled(False)

    def show_case(self, row: int) -> None:
        """Load the case's (first) scan into the scene and show its answer, reference and thumbnails."""
        record = self.records[row]
        try:
            volume_id = self.scene.load_scan(record["images"][0])
        except (RadFMError, OSError, RuntimeError) as exc:
            self.detail.setText(f"Could not load {record['images'][0]}: {exc}")
            self.current = None
            self.ask_button.setEnabled(False)
            return
        self.current = (volume_id, record)
        lines = [f"Case {record['id']} ({record.get('task')})"]
        if record.get("question"):
            lines.append(f"Question: {record['question']}")
        lines += [f"Answer: {record['answer']}" if "answer" in record else f"Failed: {record.get('error')}",
                  f"Reference: {record.get('reference', '')}"]
        scores = {k: v for k, v in (record.get("scores") or {}).items() if isinstance(v, (int, float))}
        if scores:
            lines.append("Scores: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
        self.detail.setText("\n".join(lines))
        self._show_thumbnail(record)
        self.ask_button.setEnabled(self.ask_again is not None)

    def _show_thumbnail(self, record: dict) -> None:
        seen = record.get("seen") or []
        path = self.folder / seen[0]["preview_png"] if seen and seen[0].get("preview_png") else None
        pixmap = QtGui.QPixmap(str(path)) if path is not None and path.is_file() else None
        if pixmap is None or pixmap.isNull():
            self.thumbnail.clear()
            self.thumbnail.setText("(no thumbnail: the case failed before the model ran)")
            return
        if pixmap.width() > THUMB_WIDTH:
            pixmap = pixmap.scaledToWidth(THUMB_WIDTH, QtCore.Qt.SmoothTransformation)
        self.thumbnail.setPixmap(pixmap)

    def _ask_again(self) -> None:
        if self.current is not None and self.ask_again is not None:
            self.ask_again(*self.current)
