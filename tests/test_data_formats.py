"""Every supported row shape -> the exact groups it should give (our own rows, shaped like the public ones).

    python -m pytest -q tests/test_data_formats.py
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mmrlhf_lite.data.errors import DataError
from mmrlhf_lite.data.formats import detect
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.data.templated import untemplate_prompt, untemplate_response


def png(path: Path, colour=(200, 30, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def png_bytes(colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def img(text: str) -> list[dict]:
    return [{"type": "image"}, {"type": "text", "text": text}]


def user(content) -> dict:
    return {"role": "user", "content": content}


def texts(group) -> list[str]:
    return [r.text for r in group.responses]


# --------------------------------------------------------------------------------------------- MM-RLHF

def test_mmrlhf_pairs_merge_by_id_and_recover_ranks(tmp_path):
    png(tmp_path / "long" / "0007.png")
    base = {"id": "0007_1", "prompt": "Describe the picture.", "image": "long/0007.png"}
    rows = [{**base, "chosen": "A red block on grey.", "rejected": "A block.", "chosen_reason": "complete",
             "rejected_reason": "too short"},
            {**base, "chosen": "A red block on grey.", "rejected": "A blue ball.", "chosen_reason": "complete",
             "rejected_reason": "wrong object"},
            {**base, "chosen": "A block.", "rejected": "A blue ball.", "chosen_reason": "too short",
             "rejected_reason": "wrong object"}]
    res = load_groups(jsonl(tmp_path / "pairs.jsonl", rows))
    assert res.formats == {str(tmp_path / "pairs.jsonl"): "mmrlhf"}
    [g] = res.groups
    assert (g.id, g.category, g.source) == ("0007_1", "long", f"{tmp_path / 'pairs.jsonl'}:1")
    assert g.images == [str(tmp_path / "long" / "0007.png")]
    assert g.prompt == [user(img("Describe the picture."))]
    assert [(r.text, r.rank, r.critique) for r in g.responses] == [
        ("A red block on grey.", 1, "complete"), ("A block.", 2, "too short"), ("A blue ball.", 3, "wrong object")]
    assert g.explicit_pairs is None and g.pairs() == [(0, 1), (0, 2), (1, 2)]


def test_mmrlhf_video_folder_is_sampled_and_category_is_video(tmp_path):
    frames = tmp_path / "video" / "clip-01"
    for i in range(10):
        png(frames / f"{i:03d}.png", colour=(i * 20, 0, 0))
    row = {"prompt": "What happens?", "chosen": "A ball rolls left.", "rejected": "Nothing moves.",
           "video": "video/clip-01", "chosen_reason": "", "rejected_reason": ""}
    [g] = load_groups(jsonl(tmp_path / "v.jsonl", [row]), max_frames=4).groups
    assert g.category == "video" and g.images == []
    assert [os.path.basename(f) for f in g.video] == ["001.png", "003.png", "006.png", "008.png"]
    assert g.prompt == [user([{"type": "video"}, {"type": "text", "text": "What happens?"}])]
    assert [r.critique for r in g.responses] == [None, None]  # empty reasons mean no critique


def test_mmrlhf_bench_quirks_slash_ids_double_extension_leading_space_partial_pairs(tmp_path):
    """RewardBench: ids with '/', `.png.png` names, a rejected answer with a leading space, 2 of 3 pairs."""
    png(tmp_path / "mcq" / "set_pics_0042.png.png")
    base = {"id": "set/pics/0042.png_99", "image": "mcq/set_pics_0042.png.png",
            "prompt": "Which colour?\nA. Red\nB. Blue\nAnswer with the letter."}
    rows = [{**base, "chosen": "A", "rejected": " A. Red", "chosen_reason": "just the letter",
             "rejected_reason": "letter and text"},
            {**base, "chosen": "A. Red", "rejected": "B", "chosen_reason": "letter and text",
             "rejected_reason": "wrong"}]
    res = load_groups(jsonl(tmp_path / "bench.jsonl", rows), fmt="mmrlhf_bench")
    [g] = res.groups
    assert g.id == "set/pics/0042.png_99" and g.category == "mcq"
    assert texts(g) == ["A", " A. Red", "B"]          # ' A. Red' and 'A. Red' are one response, first spelling kept
    assert g.explicit_pairs == [(0, 1), (1, 2)]       # A > A.Red > B given; A vs B was not: nothing invented
    assert res.warnings == []


def test_mmrlhf_is_tie_rows_make_ties(tmp_path):
    png(tmp_path / "i.png")
    base = {"id": "t1", "prompt": "Q?", "image": "i.png"}
    rows = [{**base, "chosen": "yes", "rejected": "no"}, {**base, "chosen": "yes", "rejected": "maybe"},
            {**base, "chosen": "no", "rejected": "maybe", "is_tie": "true"}]
    [g] = load_groups(jsonl(tmp_path / "t.jsonl", rows)).groups
    assert [(r.text, r.rank) for r in g.responses] == [("yes", 1), ("no", 2), ("maybe", 2)]
    assert g.pairs() == [(0, 1), (0, 2)] and g.ties() == [(1, 2)]


def test_vlrewardbench_as_mmrlhf_unicode_and_empty_reasons(tmp_path):
    png(tmp_path / "vl" / "img_3.jpg")
    row = {"id": "wild-battle-77", "prompt": "che colore \u00e8 ?", "chosen": "Rosso.", "rejected": "red",
           "image": "vl/img_3.jpg", "chosen_reason": "", "rejected_reason": ""}
    [g] = load_groups(jsonl(tmp_path / "vl.jsonl", [row])).groups
    assert g.prompt[0]["content"][1]["text"] == "che colore è ?"
    assert [(r.text, r.critique) for r in g.responses] == [("Rosso.", None), ("red", None)]


# ------------------------------------------------------------------------------------------------- TRL

def test_trl_typed_content_images_in_the_middle_and_text_only(tmp_path):
    png(tmp_path / "p" / "a.png")
    png(tmp_path / "p" / "b.png", colour=(0, 0, 200))
    rows = [
        {"prompt": [user([{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": " and"},
                          {"type": "image"}])],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Left is red."}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Both blue."}]}],
         "images": ["p/a.png", "p/b.png"]},
        {"prompt": [user([{"type": "text", "text": "Say hi."}])],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "No."}]}], "images": []},
    ]
    g1, g2 = load_groups(jsonl(tmp_path / "trl.jsonl", rows)).groups
    assert g1.prompt == [user([{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": " and"},
                               {"type": "image"}])]
    assert g1.images == [str(tmp_path / "p" / "a.png"), str(tmp_path / "p" / "b.png")]
    assert g2.images == [] and texts(g2) == ["Hi!", "No."]
    assert g1.id.startswith("h") and len(g1.id) == 13  # no id column: grouped and named by content


def test_trl_arrow_style_null_text_parts_and_string_content_with_singular_image(tmp_path):
    png(tmp_path / "x.png")
    rows = [{"prompt": [user([{"type": "image", "text": None}, {"type": "text", "text": "What is it?"}])],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A ring."}]}],
             "images": ["x.png"]},
            {"prompt": [user("What shape?")], "chosen": [{"role": "assistant", "content": "Square."}],
             "rejected": [{"role": "assistant", "content": "Ring."}], "image": "x.png"}]
    g1, g2 = load_groups(jsonl(tmp_path / "a.jsonl", rows)).groups
    assert g1.prompt == [user(img("What is it?"))]
    assert g2.prompt == [user(img("What shape?"))]  # string content, no tag: the image leads
    assert texts(g2) == ["Square.", "Ring."]


def test_trl_implicit_prompt(tmp_path):
    png(tmp_path / "x.png")
    conv = [user("Name the colour.")]
    row = {"chosen": conv + [{"role": "assistant", "content": "Red."}],
           "rejected": conv + [{"role": "assistant", "content": "Green."}], "image": "x.png"}
    [g] = load_groups(jsonl(tmp_path / "imp.jsonl", [row])).groups
    assert g.prompt == [user(img("Name the colour."))] and texts(g) == ["Red.", "Green."]


@pytest.mark.parametrize("prompt,chosen,rejected", [
    ("User:<image>What colour is it?<end_of_utterance>\n", "Assistant: It is red.<end_of_utterance>\n",
     "Assistant: It is blue.<end_of_utterance>\n"),
    ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is it?<|im_end|>\n"
     "<|im_start|>assistant\n", "It is red.<|im_end|>\n", "It is blue.<|im_end|>"),
])
def test_trl_templated_strings_are_untemplated(tmp_path, prompt, chosen, rejected):
    png(tmp_path / "x.png")
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "images": ["x.png"]}
    res = load_groups(jsonl(tmp_path / "tpl.jsonl", [row, {**row, "rejected": "Assistant: Green.<|im_end|>"}]))
    g = res.groups[0]
    assert g.prompt == [user(img("What colour is it?"))]
    assert texts(g)[:2] == ["It is red.", "It is blue."]
    assert len(res.warnings) == 1 and "already chat-templated" in res.warnings[0]  # once per file


def test_untemplate_helpers():
    assert untemplate_prompt("System: Be brief.<end_of_utterance>\nUser: Hi<end_of_utterance>\nAssistant:",
                             "idefics") == [("system", "Be brief."), ("user", "Hi")]
    assert untemplate_response("Hello.<|eot_id|>", "llama3") == "Hello."


# -------------------------------------------------------------------------------------------- ms-swift

def test_swift_messages_rejected_response_string_or_message_list(tmp_path):
    png(tmp_path / "cat.png")
    base = {"messages": [user("<image>What animal?"), {"role": "assistant", "content": "A cat."}],
            "images": ["cat.png"]}
    rows = [{**base, "rejected_response": "A dog."},
            {**base, "rejected_response": [{"role": "assistant", "content": "A fox."}]},
            {**base, "rejected_messages": [user("<image>What animal?"), {"role": "assistant", "content": "An owl."}],
             "rejected_images": ["cat.png"]}]
    res = load_groups(jsonl(tmp_path / "sw.jsonl", rows))
    assert res.formats[str(tmp_path / "sw.jsonl")] == "swift"
    [g] = res.groups
    assert g.prompt == [user(img("What animal?"))]
    assert texts(g) == ["A cat.", "A dog.", "A fox.", "An owl."]
    assert g.explicit_pairs == [(0, 1), (0, 2), (0, 3)]


def test_swift_multi_turn_keeps_history_and_rejects_only_the_last_answer(tmp_path):
    row = {"messages": [{"role": "system", "content": "You add numbers."}, user("2 + 2?"),
                        {"role": "assistant", "content": "4"}, user("Plus 3?"), {"role": "assistant", "content": "7"}],
           "rejected_response": "8"}
    [g] = load_groups(jsonl(tmp_path / "mt.jsonl", [row])).groups
    assert [t["role"] for t in g.prompt] == ["system", "user", "assistant", "user"]
    assert g.prompt[2]["content"] == [{"type": "text", "text": "4"}] and texts(g) == ["7", "8"]


def test_swift_v2_query_response_history_as_string_repr_and_mmrlhf_converted_rows(tmp_path):
    png(tmp_path / "MM-RLHF" / "short" / "q.png")
    rows = [{"system": "Be exact.", "query": "And now?", "response": "Six.", "rejected_response": "Five.",
             "history": "[['First?', 'One.']]", "images": ["MM-RLHF/short/q.png"]},
            {"image": "MM-RLHF/short/q.png", "question": "Count them.", "response": "Three.",
             "rejected_response": "Two."}]
    g1, g2 = load_groups(jsonl(tmp_path / "v2.jsonl", rows)).groups
    assert g1.prompt == [{"role": "system", "content": [{"type": "text", "text": "Be exact."}]},
                         user(img("First?")), {"role": "assistant", "content": [{"type": "text", "text": "One."}]},
                         user([{"type": "text", "text": "And now?"}])]
    assert (g2.category, texts(g2)) == ("short", ["Three.", "Two."])


def test_swift_row_whose_pair_differs_only_by_image_is_reported(tmp_path):
    png(tmp_path / "cat.png")
    png(tmp_path / "dog.png", colour=(1, 2, 3))
    conv = [user("<image>What animal?"), {"role": "assistant", "content": "A cat."}]
    rows = [{"messages": conv, "images": ["cat.png"], "rejected_messages": conv, "rejected_images": ["dog.png"]},
            {"messages": conv, "images": ["cat.png"], "rejected_images": ["dog.png"]}]
    path = jsonl(tmp_path / "contrast.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_groups(path)
    assert str(err.value) == (
        f"{path}:1: key 'rejected_images': it differs from 'images', so this pair contrasts two images rather than "
        "two responses; a preference group shares one prompt and its media across responses, so image-contrast "
        "pairs are not supported")
    with pytest.raises(DataError, match="no preference groups were loaded from 2 row"):
        load_groups(path, on_error="skip")


# --------------------------------------------------------------------------------------- LLaMA-Factory

def test_llamafactory_sharegpt_roletags_in_a_jsonl_file_holding_a_json_array(tmp_path):
    png(tmp_path / "memes" / "1.jpg")
    rows = [{"messages": [{"content": "<image>Is it kind? Answer in <answer> </answer>.", "role": "user"}],
             "chosen": {"content": "<think> friendly words </think>\n<answer> Yes </answer>", "role": "assistant"},
             "rejected": {"content": "<think>mean</think>\n<answer>No</answer>", "role": "assistant"},
             "images": ["memes/1.jpg"]},
            {"messages": [{"content": "<image>Is it kind?", "role": "user"}],
             "chosen": {"content": "Yes", "role": "assistant"}, "rejected": {"content": "No", "role": "assistant"},
             "images": ["memes/1.jpg"]}]
    path = tmp_path / "dpo_memes.jsonl"
    path.write_text(json.dumps(rows, indent=2))  # named .jsonl, holds one pretty-printed array
    g1, g2 = load_groups(path).groups
    assert g1.source == f"{path}:2" and g2.source == f"{path}:21"  # each element located by its first line
    assert g1.prompt == [user(img("Is it kind? Answer in <answer> </answer>."))]
    assert texts(g1) == ["<think> friendly words </think>\n<answer> Yes </answer>",
                         "<think>mean</think>\n<answer>No</answer>"]


def test_llamafactory_from_value_multi_turn_and_system_column(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "12 * 3?"}], "system": "Math only.",
             "chosen": {"from": "gpt", "value": "36"}, "rejected": {"from": "gpt", "value": "38"}}]
    path = tmp_path / "ff.json"
    path.write_text(json.dumps(rows))
    [g] = load_groups(path).groups
    assert [t["role"] for t in g.prompt] == ["system", "user", "assistant", "user"] and texts(g) == ["36", "38"]


def test_llamafactory_v1_chosen_and_rejected_messages_with_value_parts(tmp_path):
    png(tmp_path / "d" / "1.jpg")
    system = {"role": "system", "content": [{"type": "text", "value": "Answer briefly."}], "loss_weight": 0.0}
    ask = {"role": "user", "content": [{"type": "image_url", "value": "d/1.jpg"},
                                       {"type": "text", "value": "What is shown?"}], "loss_weight": 0.0}
    row = {"chosen_messages": [system, ask, {"role": "assistant", "content": [{"type": "text", "value": "A tree."}],
                                             "loss_weight": 1.0}],
           "rejected_messages": [system, ask, {"role": "assistant", "content": [{"type": "text", "value": " A car."}],
                                               "loss_weight": 1.0}]}
    [g] = load_groups(jsonl(tmp_path / "v1.jsonl", [row])).groups
    assert g.images == [str(tmp_path / "d" / "1.jpg")]
    assert g.prompt[1] == user(img("What is shown?")) and texts(g) == ["A tree.", " A car."]


# --------------------------------------------------------------------------------------- RLAIF-V, RLHF-V

def test_rlaifv_image_dict_with_bytes_and_path_and_pairs_grouped_by_question_and_image(tmp_path):
    png(tmp_path / "pics" / "7.jpg")
    data = png_bytes()
    rows = [{"ds_name": "toy", "idx": "101", "question": "What is on the table?", "chosen": "A cup.",
             "rejected": "A plate.", "image": {"bytes": None, "path": "pics/7.jpg"}, "origin_dataset": "toy-set"},
            {"idx": "102", "question": "What is on the table?", "chosen": "A cup.", "rejected": "A spoon.",
             "image": {"bytes": None, "path": "pics/7.jpg"}},
            {"idx": "103", "question": "Colour?", "chosen": "Green.", "rejected": "Pink.",
             "image": {"bytes": list(data), "path": "ignored.png"}}]
    g1, g2 = load_groups(jsonl(tmp_path / "rlaifv.jsonl", rows)).groups
    assert g1.id == "101" and g1.meta == {"ds_name": "toy", "origin_dataset": "toy-set"}
    assert texts(g1) == ["A cup.", "A plate.", "A spoon."] and g1.explicit_pairs == [(0, 1), (0, 2)]
    assert g2.images == [data]  # inline bytes stay bytes in memory


def test_rlhfv_llava_style_conversations_plus_rejected_string(tmp_path):
    png(tmp_path / "raw" / "00001.jpg")
    rows = [{"image": "raw/00001.jpg", "conversations": [{"from": "human", "value": "What is the man doing?"},
                                                         {"from": "gpt", "value": "He is reading."}],
             "rejected": "He is reading a red newspaper on a bench.", "origin_dataset": "toy",
             "origin_split": "{\"model\": \"m1\", \"type\": \"detail\"}", "idx": 0}]
    path = tmp_path / "rlhfv.json"
    path.write_text(json.dumps(rows, indent=4))
    res = load_groups(path)
    [g] = res.groups
    assert res.formats[str(path)] == "rlhfv" and g.id == "0"
    assert g.meta == {"origin_dataset": "toy", "origin_split": {"model": "m1", "type": "detail"}}
    assert g.prompt == [user(img("What is the man doing?"))]


# ------------------------------------------------------------------------------------------- VLFeedback

def test_vlfeedback_ranks_from_mean_rating_with_na_and_missing_aspects(tmp_path):
    png(tmp_path / "q1.jpg")
    row = {"id": "q1", "prompt": "Is  there a cat?", "completions": [
        {"model": "m1", "response": "Yes, one cat.", "annotations": {
            "Helpfulness": {"Rating": "4", "Rationale": "Right."}, "Visual Faithfulness": {"Rating": "5"}}},
        {"model": "m2", "response": "No.", "annotations": {"Helpfulness": {"Rating": "N/A"},
                                                          "Visual Faithfulness": {"Rating": "2"}}},
        {"model": "m3", "response": "Maybe.", "annotations": {"Helpfulness": {"Rating": "N/A"}}},
        {"model": "m4", "response": "A cat sits.", "annotations": {"Helpfulness": {"Rating": 4.5, "Rationale": "ok"},
                                                                  "Ethical Considerations": {"Rating": "4.5",
                                                                                             "Rationale": "fine"}}}]}
    res = load_groups(jsonl(tmp_path / "vlf.jsonl", [row]))
    [g] = res.groups
    assert g.images == [str(tmp_path / "q1.jpg")]  # <media root>/<id>.jpg, the VLFeedback loader's convention
    assert g.prompt == [user(img("Is  there a cat?"))]
    assert [(r.text, r.score, r.critique) for r in g.responses] == [
        ("Yes, one cat.", 4.5, "Right."), ("No.", 2.0, None),
        ("A cat sits.", 4.5, "Helpfulness (4.5): ok\nEthical Considerations (4.5): fine")]
    assert g.ranks() == [1, 2, 1] and g.ties() == [(0, 2)]
    assert g.meta["models"] == ["m1", "m2", "m4"]
    assert res.warnings == [f"{tmp_path / 'vlf.jsonl'}:1: key 'completions[2]': no numeric rating (all N/A or "
                            "missing), so it cannot be ranked; left out of group 'q1'"]


def test_vlfeedback_struct_of_lists_layout(tmp_path):
    row = {"id": "s-1", "prompt": "Any signs?", "img_path": None, "completions": {
        "model": ["a", "b"], "response": ["No.", "Yes, two."],
        "annotations": [{"Helpfulness": {"Rating": "2", "Rationale": "x"}, "Visual Faithfulness": None},
                        {"Helpfulness": {"Rating": "5", "Rationale": "y"}, "Visual Faithfulness": {"Rating": "4"}}]}}
    res = load_groups(jsonl(tmp_path / "sol.jsonl", [row]))
    [g] = res.groups
    assert [(r.text, r.score) for r in g.responses] == [("No.", 2.0), ("Yes, two.", 4.5)]
    assert g.images == [] and "read as text-only" in res.warnings[0]


# ------------------------------------------------------------------------------------------------ ranked

def test_ranked_native_rows_with_scores_only_and_explicit_pairs(tmp_path):
    png(tmp_path / "a.png")
    rows = [{"id": 5, "prompt": "<image>Rate it.", "images": ["a.png"], "category": "colour",
             "responses": [{"text": "good", "score": 0.9, "critique": "fine"}, {"text": "bad", "score": 0.1}]},
            {"id": "p", "prompt": [user(img("Pick."))], "images": ["a.png"],
             "responses": [{"text": "x"}, {"text": "y"}, {"text": "z"}], "pairs": [[0, 1], [2, 1]]}]
    g1, g2 = load_groups(jsonl(tmp_path / "r.jsonl", rows)).groups
    assert (g1.id, g1.category, g1.ranks(), g1.prompt) == ("5", "colour", [1, 2], [user(img("Rate it."))])
    assert g2.pairs() == [(0, 1), (2, 1)] and g2.ties() == [] and g2.best_index() == 0


# ------------------------------------------------------------------------------------------ detection

@pytest.mark.parametrize("row,fmt", [
    ({"id": "a", "prompt": [], "responses": []}, "ranked"),
    ({"id": "a", "prompt": "q", "completions": []}, "vlfeedback"),
    ({"chosen_messages": [], "rejected_messages": []}, "llamafactory"),
    ({"messages": [], "rejected_response": "x"}, "swift"),
    ({"messages": [], "rejected_images": ["x"]}, "swift"),
    ({"query": "q", "response": "a", "rejected_response": "b"}, "swift"),
    ({"conversations": [], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
     "llamafactory"),
    ({"conversations": [], "rejected": "b", "image": "x"}, "rlhfv"),
    ({"question": "q", "chosen": "a", "rejected": "b", "image": "x"}, "rlaifv"),
    ({"prompt": [], "chosen": [], "rejected": []}, "trl"),
    ({"chosen": [], "rejected": [], "image": "x"}, "trl"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "images": ["x"]}, "trl"),
    ({"prompt": "User:q<end_of_utterance>\n", "chosen": "a", "rejected": "b"}, "trl"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "image": "x"}, "mmrlhf"),
    ({"id": "1", "prompt": "q", "chosen": "a", "rejected": "b", "video": "v", "image": None}, "mmrlhf"),
    ({"prompt": "q", "answer": "a"}, None),
])
def test_detect(row, fmt):
    assert detect(row) == fmt


def test_unknown_row_shape_names_its_fields(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"prompt": "q", "answer": "a", "extra": None}])
    with pytest.raises(DataError) as err:
        load_groups(path)
    assert str(err.value) == (f"{path}:1: cannot tell the format from the fields ['answer', 'prompt']; set "
                              "data.format to one of ranked, mmrlhf, mmrlhf_bench, trl, swift, llamafactory, rlaifv, "
                              "rlhfv, vlfeedback, vl_rewardbench, mm_rewardbench (docs/data-formats.md)")


def test_llamafactory_video_folder_and_swift_image_dicts(tmp_path):
    for i in range(3):
        png(tmp_path / "clips" / "a" / f"{i}.png", colour=(i * 50, 0, 0))
    png(tmp_path / "x.png")
    rows = [{"messages": [user("<video>What moves?")], "chosen": {"role": "assistant", "content": "A car."},
             "rejected": {"role": "assistant", "content": "A tree."}, "videos": ["clips/a"]}]
    [g] = load_groups(jsonl(tmp_path / "lf_video.jsonl", rows)).groups
    assert g.video == [str(tmp_path / "clips" / "a" / f"{i}.png") for i in range(3)]
    assert g.prompt == [user([{"type": "video"}, {"type": "text", "text": "What moves?"}])]
    rows = [{"messages": [user("<image>Q?"), {"role": "assistant", "content": "A"}], "rejected_response": "B",
             "images": [{"bytes": None, "path": "x.png"}]}]
    [g] = load_groups(jsonl(tmp_path / "sw_dict.jsonl", rows)).groups
    assert g.images == [str(tmp_path / "x.png")]
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00")
    rows[0]["videos"] = ["clip.mp4"]
    path = jsonl(tmp_path / "sw_mp4.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_groups(path)
    assert str(err.value) == (f"{path}:1: key 'videos[0]': video files are not decoded; give a folder of frames or a "
                              f"list of frame paths instead: {tmp_path / 'clip.mp4'}")


def test_best_vs_worst_with_pairs_as_given_is_the_best_against_the_worst():
    """Pairs listed out of order (no ranking to recover): the pair of the most- and least-preferred
    responses, not the first one listed."""
    from mmrlhf_lite.data.groups import PreferenceGroup, Response

    g = PreferenceGroup(id="g", prompt=[{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                        responses=[Response("A"), Response("B"), Response("C")],
                        explicit_pairs=[(1, 2), (0, 1), (0, 2)])
    assert g.best_vs_worst() == [(0, 2)]
    chain = PreferenceGroup(id="c", prompt=g.prompt, responses=g.responses, explicit_pairs=[(1, 2), (0, 1)])
    assert chain.best_vs_worst() == [(0, 1)]  # (0, 2) is not given: the best's own pair, nothing invented
