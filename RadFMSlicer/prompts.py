"""Task templates and prompt assembly, following RadFM's training prompts.

Each template is one of the prompts RadFM was tuned with (``radfm-prompts/*.json``), so
the model sees the phrasing it learned. Training put the image tags before the
question, the question ended with punctuation (without it the model often answers
nothing), and each question stood alone: RadFM was not trained on dialogue.
"""

import unicodedata
from dataclasses import dataclass

from .errors import PromptError
from .tokenizer import image_tag, special_tags_in

# task -> (template, training prompt file it comes from)
TEMPLATES = {
    "report": ("Please write a radiology report for this scan.", "report_prompt.json"),
    "rationale": (
        "What disease can be diagnosed from these radiological images and what specific features "
        "are typically observed on the images?",
        "radiology_feature_prompt.json",
    ),
    "modality": ("What modality is used to take this image?", "modality_prompt.json"),
    "diagnosis": ("Can you identify any visible signs of {finding} in the image?", "yes_no_prompt.json"),
    "vqa": ("{question}", None),
}
TASKS = tuple(TEMPLATES)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_QUESTION_WORDS = {
    "is", "are", "was", "were", "do", "does", "did", "can", "could", "what", "which", "where", "when",
    "who", "why", "how", "should", "would", "will", "has", "have", "any",
}


@dataclass
class PromptImage:
    """How the prompt refers to one image: a label, and facts for region images."""

    label: str  # e.g. "current study", "prior study", 'marked region "lesion"'
    facts: str | None = None


def check_user_text(text, what: str = "the question") -> None:
    """Refuse text that is not what a person typed, before any model work: every typed field
    (question, finding, history, earlier turns) enters the prompt through here.

    Text must be a string of real characters: a lone surrogate (bytes that were not UTF-8,
    as Python reads them from a command line or file) would crash the tokenizer, and
    control characters (NUL, ESC, ...) would reach the prompt and the saved reports as
    bytes. RadFM's image tags (``<image>``, ``</image>``, ``<image0>``...) typed as text would
    become the model's own image tokens, so they are refused by name.
    """
    if not isinstance(text, str):
        raise PromptError(f"{what} must be text, got {type(text).__name__}")
    for at, char in enumerate(text, 1):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte Python could not decode as UTF-8 (surrogateescape)
            raise PromptError(f"{what} is not UTF-8 text (byte 0x{code - 0xDC00:02x} at character {at}): "
                              f"type it again, or save the file it came from as UTF-8")
        if 0xD800 <= code <= 0xDFFF:
            raise PromptError(f"{what} holds a lone surrogate U+{code:04X} at character {at}, not a character: "
                              f"send it as UTF-8 text")
        if unicodedata.category(char) == "Cc" and not char.isspace():
            raise PromptError(f"{what} holds the control character U+{code:04X} at character {at}: remove it")
    tags = special_tags_in(text)
    if tags:
        raise PromptError(f"{what} contains {tags[0]!r}, one of the model's own image tags; typed text never "
                          f"becomes image tokens, so reword it (e.g. 'image' without the angle brackets)")


def finish_sentence(text: str) -> str:
    """End a question with '?' (or an instruction with '.') unless it has end punctuation."""
    text = " ".join(text.split())
    if not text:
        raise PromptError("the question is empty: type a question or pick a task such as report")
    if text[-1] in ".?!":
        return text
    first_word = text.split()[0].lower().strip(",:;")
    return text + ("?" if first_word in _QUESTION_WORDS else ".")


def task_question(task: str, question: str | None = None, finding: str | None = None) -> str:
    """The question text of a task (before image tags and context)."""
    if task not in TEMPLATES:
        raise PromptError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    template = TEMPLATES[task][0]
    for text, what in ((question, "the question"), (finding, "the finding")):
        if text is not None:
            check_user_text(text, what)
    if task == "vqa":
        if not question or not question.strip():
            raise PromptError("task vqa needs a question (--question)")
        return finish_sentence(question)
    if task == "diagnosis":
        finding = " ".join((finding or question or "").split()).rstrip("?.!")
        if not finding:
            raise PromptError("task diagnosis needs the finding to look for, e.g. --question 'pleural effusion'")
        if finding.split()[0].lower() in _QUESTION_WORDS - {"any"}:  # "Is there pneumonia": a whole question
            return finding + "?"
        return template.format(finding=finding)
    if question and question.strip():  # a user's own wording of a fixed task
        return finish_sentence(question)
    return template


def build_prompt(
    task: str,
    images: list[PromptImage],
    question: str | None = None,
    history: str | None = None,
    previous_turns: list[tuple[str, str]] | None = None,
    tokens_per_image: int = 32,
) -> str:
    """The full prompt text: history, earlier turns (optional), image tags, labels, question."""
    if not images:
        raise PromptError("RadFM needs at least one image")
    if len(images) > len(ORDINALS):
        raise PromptError(f"at most {len(ORDINALS)} images per question")
    if history is not None:
        check_user_text(history, "the clinical history")
    for n, (q, a) in enumerate(previous_turns or [], 1):
        check_user_text(q, f"earlier question {n}")
        check_user_text(a, f"earlier answer {n}")
    parts = []
    if history and history.strip():
        parts.append("Clinical history: " + " ".join(history.split()).rstrip(".") + ".")
    for q, a in previous_turns or []:
        parts.append(f"Earlier question: {q} Earlier answer: {a}")
    tags = "".join(image_tag(k, tokens_per_image) for k in range(len(images)))
    labels = []
    if len(images) > 1 or images[0].facts:
        labels = [img.facts or f"The {ORDINALS[k]} image is the {img.label}." for k, img in enumerate(images)]
    # Tags directly before the text, as in training (whitespace beside them is dropped anyway).
    parts.append(tags + " ".join([*labels, task_question(task, question)]))
    return " ".join(parts)
