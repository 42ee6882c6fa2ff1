"""Prompts follow RadFM's training templates; sessions keep provenance and round-trip."""

import pytest

from RadFMSlicer.errors import PromptError, RadFMError
from RadFMSlicer.prompts import TEMPLATES, PromptImage, build_prompt, finish_sentence, task_question
from RadFMSlicer.session import DISCLAIMER, Session, Turn
from RadFMSlicer.tokenizer import image_tag


def test_every_template_is_a_training_prompt(training_prompts):
    for task, (template, source) in TEMPLATES.items():
        if source is None:
            continue
        training = training_prompts(source)
        expected = template.replace("{finding}", "disease")
        assert expected in training, (task, template)


@pytest.mark.parametrize(
    "text, expected",
    [("Is there a pleural effusion", "Is there a pleural effusion?"), ("Describe the liver", "Describe the liver."),
     ("What is this?", "What is this?"), ("  is   there  fluid ", "is there fluid?")],
)
def test_questions_get_end_punctuation(text, expected):
    assert finish_sentence(text) == expected


def test_diagnosis_names_the_finding_in_the_training_template():
    assert task_question("diagnosis", "Cardiomegaly") == "Can you identify any visible signs of Cardiomegaly in the image?"


@pytest.mark.parametrize("task, question", [("vqa", None), ("vqa", "  "), ("diagnosis", None), ("bogus", "x")])
def test_incomplete_requests_are_refused(task, question):
    with pytest.raises(PromptError):
        task_question(task, question)


def test_single_image_prompt_is_exactly_the_training_layout():
    prompt = build_prompt("report", [PromptImage("current study")])
    assert prompt == image_tag(0) + "Please write a radiology report for this scan."


def test_history_first_then_tags_then_labels_then_question():
    prompt = build_prompt(
        "vqa", [PromptImage("current study"), PromptImage("prior study")], question="What has changed",
        history="67 y, female, follow-up of a lung nodule",
    )
    assert prompt.startswith("Clinical history: 67 y, female, follow-up of a lung nodule.")
    tags = image_tag(0) + image_tag(1)
    assert prompt.index(tags) < prompt.index("The first image is the current study.")
    assert prompt.index("The second image is the prior study.") < prompt.index("What has changed?")
    assert prompt.endswith("What has changed?")


def test_region_facts_replace_the_label():
    facts = 'The second image is a close-up of the marked region "lesion": about 20 x 15 x 10 mm.'
    prompt = build_prompt("vqa", [PromptImage("current study"), PromptImage("region", facts)], question="Is it solid?")
    assert facts in prompt and "The first image is the current study." in prompt


def test_session_round_trip_and_markdown(tmp_path):
    session = Session()
    session.add_turn({
        "task": "report", "question": "Please write a radiology report for this scan.",
        "answer": "No acute findings.", "stop_reason": "eos", "prompt": "<image 1>Please write...",
        "images": [{"role": "current", "label": "CT chest", "source": "/data/ct.nii.gz", "shape": [3, 512, 512, 64],
                    "window": {"mode": "window", "preset": "lung", "center": -600.0, "width": 1500.0,
                               "low": -1350.0, "high": 150.0}}],
        "provenance": {"model": {"checkpoint": "/models/RadFM", "dtype": "bfloat16", "device": "cuda"},
                       "settings": {"max_new_tokens": 256}},
    })
    restored = Session.from_json(session.to_json())
    assert restored.turns[0] == session.turns[0]
    markdown = restored.to_markdown()
    for expected in (DISCLAIMER, "No acute findings.", "/data/ct.nii.gz", "[3, 512, 512, 64]", "lung C-600/W1500",
                     "bfloat16"):
        assert expected in markdown


def test_previous_turns_skip_failed_ones():
    session = Session()
    session.add_turn(Turn("vqa", "Q1?", "A1"))
    session.add_turn(Turn("vqa", "Q2?", "", error="worker died"))
    assert session.previous_turns() == [("Q1?", "A1")]


def test_not_a_session_file():
    with pytest.raises(RadFMError, match="not a RadFM session"):
        Session.from_json('{"hello": 1}')


# The prompt every front end sends: ask.prepare (CLI, batch, worker, panel) on a real scan.
@pytest.mark.parametrize("task, question", [
    ("report", None), ("rationale", None), ("modality", None), ("diagnosis", "pneumonia"),
    ("diagnosis", " pleural  effusion? "), ("vqa", "Is there a pleural effusion"),
])
def test_prepared_prompt_is_the_image_tag_then_a_training_prompt(task, question, training_prompts):
    from pydicom.data import get_testdata_file

    from RadFMSlicer.ask import AskRequest, ImageInput, prepare

    prepared = prepare(AskRequest(task=task, question=question, images=[ImageInput(path=get_testdata_file("CT_small.dcm"))]))
    assert prepared.prompt.startswith(image_tag(0))
    text = prepared.prompt[len(image_tag(0)):]
    assert text == prepared.question
    template, source = TEMPLATES[task]
    if task == "diagnosis":
        finding = " ".join(question.split()).rstrip("?")
        assert text.replace(finding, "disease", 1) in training_prompts(source)
        assert text.count(finding) == 1 and text.count("signs of") == 1
    elif source is None:
        assert text == "Is there a pleural effusion?"
    else:
        assert text in training_prompts(source)


def test_diagnosis_asked_as_a_whole_question_is_not_wrapped_again():
    assert task_question("diagnosis", "Is there pneumonia") == "Is there pneumonia?"
    assert task_question("diagnosis", "any consolidation") == \
        "Can you identify any visible signs of any consolidation in the image?"
