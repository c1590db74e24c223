"""The one prompt builder (few-shot contents, train/inference parity) and caption cleaning."""

import pytest

from medcap.generators.prompts import DEFAULT_PROMPT, build_messages, training_messages
from medcap.models.captions import clean_caption
from medcap.records import Neighbour, NeighbourList


def neighbours(qid="q1"):
    return NeighbourList(
        qid,
        (
            Neighbour("n1", 0.9, "CT of the chest with a right upper lobe mass."),
            Neighbour(qid, 0.89, "THE QUERY'S OWN CAPTION"),  # a leak the builder must drop
            Neighbour("n2", 0.8, None),  # no caption: skipped
            Neighbour("n3", 0.7, "Axial MRI of the brain\n  with   a ring-enhancing lesion."),
            Neighbour("n4", 0.6, "   "),
            Neighbour("n5", 0.5, "Chest X-ray showing cardiomegaly."),
        ),
    )


def texts(messages):
    return [p["text"] for m in messages for p in m["content"] if p["type"] == "text"]


def parts(messages):
    return [p["type"] for m in messages for p in m["content"]]


@pytest.mark.parametrize("mode", ["zero-shot", "sft"])
def test_zero_shot_and_sft_prompt_is_image_then_instruction(mode):
    messages, ids = build_messages(mode, neighbours=neighbours(), instruction="Caption it.", query_id="q1")
    assert messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption it."}]}]
    assert ids == []
    default, _ = build_messages(mode)
    assert texts(default) == [DEFAULT_PROMPT]


@pytest.mark.parametrize("mode", ["zero-shot", "sft", "few-shot"])
def test_training_prompt_equals_inference_prompt(mode):
    infer, _ = build_messages(mode, neighbours=neighbours(), k=2, query_id="q1")
    train = training_messages(build_messages(mode, neighbours=neighbours(), k=2, query_id="q1")[0], "A  caption\n.")
    assert train[:-1] == infer
    assert train[-1] == {"role": "assistant", "content": [{"type": "text", "text": "A caption ."}]}


def test_few_shot_shows_exactly_k_neighbour_captions_in_order_never_the_query():
    messages, ids = build_messages("few-shot", neighbours=neighbours(), k=2, query_id="q1")
    (text,) = texts(messages)
    assert parts(messages) == ["image", "text"]
    assert ids == []
    assert (
        "1. CT of the chest with a right upper lobe mass.\n2. Axial MRI of the brain with a ring-enhancing lesion."
        in text
    )
    assert "QUERY" not in text and "cardiomegaly" not in text and text.endswith(DEFAULT_PROMPT)
    # k=None: every captioned neighbour but the query's own
    all_text = texts(build_messages("few-shot", neighbours=neighbours(), query_id="q1")[0])[0]
    assert all_text.count("\n") - text.count("\n") == 1 and "3. Chest X-ray showing cardiomegaly." in all_text
    assert "QUERY" not in all_text


def test_few_shot_query_id_defaults_to_the_neighbour_list_id():
    (text,) = texts(build_messages("few-shot", neighbours=neighbours("q1"), k=5)[0])
    assert "QUERY" not in text


def test_few_shot_with_images_interleaves_examples_before_the_query_image():
    messages, ids = build_messages("few-shot", neighbours=neighbours(), k=3, shot_images=True, query_id="q1")
    assert ids == ["n1", "n3", "n5"]
    content = messages[0]["content"]
    assert parts(messages) == ["text"] + ["text", "image", "text"] * 3 + ["text", "image", "text"]
    assert content[3]["text"] == "Caption: CT of the chest with a right upper lobe mass."
    assert content[9]["text"] == "Caption: Chest X-ray showing cardiomegaly."
    assert content[-2:] == [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]


def test_few_shot_images_respect_the_family_image_limit():
    messages, ids = build_messages(
        "few-shot", neighbours=neighbours(), k=3, shot_images=True, query_id="q1", max_images=2
    )
    assert ids == ["n1"]  # one neighbour image + the query image
    assert parts(messages).count("image") == 2
    assert "Example 3 caption: Chest X-ray showing cardiomegaly." in texts(messages)


def test_few_shot_without_neighbours_is_the_zero_shot_prompt():
    assert build_messages("few-shot", neighbours=None)[0] == build_messages("zero-shot")[0]


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="few_shot"):
        build_messages("few_shot")


CLEAN_CASES = [
    (
        "ASSISTANT: Axial CT of the chest showing a right upper lobe mass",
        "Axial CT of the chest showing a right upper lobe mass.",
    ),
    ("<|im_start|>assistant\nChest X-ray with bilateral effusions.<|im_end|>", "Chest X-ray with bilateral effusions."),
    ("model\nMRI brain showing ring-enhancing lesion", "MRI brain showing ring-enhancing lesion."),
    (
        'Sure! Here is a caption for the image:\n\n"Ultrasound of the gallbladder with stones."',
        "Ultrasound of the gallbladder with stones.",
    ),
    ("Caption: Sagittal T2 MRI of the lumbar spine.", "Sagittal T2 MRI of the lumbar spine."),
    ("The caption is: CT abdomen with contrast", "CT abdomen with contrast."),
    ("**Axial CT scan demonstrating pneumothorax.**", "Axial CT scan demonstrating pneumothorax."),
    (
        "1. Chest radiograph showing cardiomegaly.\n2. Frontal chest X-ray with enlarged heart.",
        "Chest radiograph showing cardiomegaly.",
    ),
    ("- Axial CT showing a liver lesion\n- Another option", "Axial CT showing a liver lesion."),
    (
        "Here are some possible captions:\n\n1. CT of the head showing hemorrhage.\n2. Head CT with bleed.",
        "CT of the head showing hemorrhage.",
    ),
    ("Certainly. Brain MRI with   multiple\n white matter lesions", "Brain MRI with multiple white matter lesions."),
    ("\u201cCoronal CT of the sinuses\u201d", "Coronal CT of the sinuses."),
    ('Assistant: Caption: "PET-CT showing FDG avid node"', "PET-CT showing FDG avid node."),
    ("Chest X-ray.\n\nThis image shows something else entirely.", "Chest X-ray."),
    (
        "<start_of_turn>model\nDiagnostic caption: Doppler ultrasound of the carotid artery<end_of_turn>",
        "Doppler ultrasound of the carotid artery.",
    ),
    ("Is there a fracture?", "Is there a fracture?"),
    ("", ""),
    ("   \n\t ", ""),
    ("**Caption:**", ""),
]


@pytest.mark.parametrize(("raw", "expected"), CLEAN_CASES)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected
