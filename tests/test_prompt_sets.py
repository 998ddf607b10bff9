"""Public prompt sets read from tiny files in each published format, their errors, and `rdm sample --prompt-set`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rdm_lightning.cli import main
from rdm_lightning.data.prompt_sets import HPSV2_STYLES, PROMPT_SETS, load_prompt_set, prompt_set_names
from rdm_lightning.tools import build_parser, checked_sample_prompts


def write_coco(path: Path, captions: list) -> Path:
    """A captions_val2014.json-shaped file: info, images, licenses and one annotation per caption."""
    annotations = [{"image_id": 9000 - i, "id": 100 + i, "caption": caption} for i, caption in enumerate(captions)]
    data = {"info": {"year": 2014}, "images": [{"id": 9000, "file_name": "COCO_val2014_000000009000.jpg"}],
            "licenses": [], "annotations": annotations}
    path.write_text(json.dumps(data))
    return path


def write_hpsv2(folder: Path, prompts_of: dict[str, list]) -> Path:
    folder.mkdir(exist_ok=True)
    for style, prompts in prompts_of.items():
        (folder / f"{style}.json").write_text(json.dumps(prompts))
    return folder


HPSV2 = {"photo": ["Large dog looking at television.", "A red car."], "anime": ["Walter White as a king."],
         "paintings": ["A serene meadow."], "concept-art": ["Portrait of the goddess of autumn."]}


def test_coco_captions_in_file_order_stripped(tmp_path):
    path = write_coco(tmp_path / "captions_val2014.json", ["A man riding a horse.\n", " Two dogs on a couch. ", "A bowl."])
    assert load_prompt_set("coco", path) == ["A man riding a horse.", "Two dogs on a couch.", "A bowl."]


def test_drawbench_csv(tmp_path):
    path = tmp_path / "drawbench.csv"
    path.write_text('Prompts,Category\nA pink colored giraffe.,Colors\n"A bird, scaring a scarecrow.",Conflicting\n'
                    '"A sign that says ""Deep Learning"".",Text\n')
    assert load_prompt_set("drawbench", path) == [
        "A pink colored giraffe.", "A bird, scaring a scarecrow.", 'A sign that says "Deep Learning".']


def test_hpsv2_folder_by_sorted_style_one_style_and_one_file(tmp_path):
    folder = write_hpsv2(tmp_path / "benchmark", HPSV2)
    (folder / "benchmark_imgs").mkdir()  # the published folder also holds the reference images
    expected = [prompt for style in sorted(HPSV2) for prompt in HPSV2[style]]
    assert sorted(HPSV2) == list(HPSV2_STYLES)
    assert load_prompt_set("hpsv2", folder) == expected
    assert load_prompt_set("hpsv2/photo", folder) == HPSV2["photo"]
    assert load_prompt_set("hpsv2", folder / "anime.json") == HPSV2["anime"]
    assert load_prompt_set("hpsv2/anime", folder / "anime.json") == HPSV2["anime"]
    with pytest.raises(ValueError, match=r"hpsv2/photo asks for the style 'photo', but .*anime.json' is the file of 'anime'"):
        load_prompt_set("hpsv2/photo", folder / "anime.json")
    (folder / "paintings.json").unlink()
    with pytest.raises(ValueError, match=r"lacks \['paintings.json'\].*huggingface.co/datasets/zhwang/HPDv2"):
        load_prompt_set("hpsv2", folder)
    assert load_prompt_set("hpsv2/photo", folder) == HPSV2["photo"]


def test_partiprompts_tsv_keeps_bare_quotes(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text('Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\tBiology-inspired concepts\n'
                    'A robot painted as graffiti. The words "Fly an airplane" are written.\tOutdoor Scenes\tComplex\t\n'
                    '"Hello" written on a board\tIllustrations\tWriting & Symbols\t\n')
    assert load_prompt_set("partiprompts", path) == [
        "bond", 'A robot painted as graffiti. The words "Fly an airplane" are written.', '"Hello" written on a board']


def test_geneval_metadata_jsonl(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
             {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
              "prompt": "a photo of two cats"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert load_prompt_set("geneval", path) == ["a photo of a bench", "a photo of two cats"]


MALFORMED = [
    ("coco", "captions.json", "{not json", r"is not valid JSON"),
    ("coco", "captions.json", json.dumps({"images": []}), r"not a JSON object with an 'annotations' list"),
    ("coco", "captions.json", json.dumps({"annotations": [{"caption": "ok"}, {"image_id": 1, "id": 2}]}),
     r"annotations\[1\] has no 'caption'"),
    ("coco", "captions.json", json.dumps({"annotations": [{"caption": "  "}]}), r"annotations\[0\]: 'caption' must be a non-empty"),
    ("coco", "captions.json", json.dumps({"annotations": [], "images": []}), r"holds no prompts"),
    ("drawbench", "drawbench.csv", "prompt,category\na cat,Colors\n", r"has no column 'Prompts'; its columns are \['prompt', 'category'\]"),
    ("drawbench", "drawbench.csv", "Prompts,Category\na cat,Colors\n,Colors\n", r"line 3: 'Prompts' must be a non-empty string"),
    ("partiprompts", "PartiPrompts.tsv", "Prompt,Category,Challenge,Note\nbond,Abstract,Basic,\n", r"has no column 'Prompt'"),
    ("partiprompts", "PartiPrompts.tsv", "Prompt\tCategory\tChallenge\tNote\n", r"holds no prompts"),
    ("geneval", "evaluation_metadata.jsonl", '{"prompt": "a photo of a cat"}\n{"tag": "counting"}\n', r"line 2 has no field 'prompt'"),
    ("geneval", "evaluation_metadata.jsonl", '{"prompt": "a cat"}\nnot json\n', r"line 2 is not valid JSON"),
    ("hpsv2", "anime.json", json.dumps({"anime": ["a cat"]}), r"holds a JSON dict, not a list of prompts"),
    ("hpsv2", "anime.json", json.dumps(["a cat", 3]), r"entry \[1\]: 'prompt' must be a non-empty string, got 3"),
]


@pytest.mark.parametrize(("name", "file_name", "content", "message"), MALFORMED)
def test_malformed_files_name_the_file_the_entry_the_format_and_where_it_is_published(tmp_path, name, file_name, content, message):
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_prompt_set(name, path)
    text = str(error.value)
    assert str(path) in text and PROMPT_SETS[name].expected in text and PROMPT_SETS[name].published in text


def test_unknown_names_missing_files_and_folders(tmp_path):
    accepted = "accepted: coco, drawbench, hpsv2, partiprompts, geneval, hpsv2/anime, hpsv2/concept-art"
    for name in ("parti", "coco/val", "hpsv2/cartoon"):
        with pytest.raises(ValueError, match=f"unknown prompt set {name!r}; {accepted}"):
            load_prompt_set(name, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not found: .*missing.tsv.*github.com/google-research/parti"):
        load_prompt_set("partiprompts", tmp_path / "missing.tsv")
    with pytest.raises(IsADirectoryError, match="is a folder; a 'geneval' prompt set is GenEval's"):
        load_prompt_set("geneval", tmp_path)
    latin = tmp_path / "drawbench.csv"
    latin.write_bytes("Prompts,Category\ncaf\xe9,Colors\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_prompt_set("drawbench", latin)
    assert prompt_set_names()[-1] == "hpsv2/photo"


def sample_args(tmp_path: Path, *source: str):
    return build_parser().parse_args(["sample", "--checkpoint", "unused.ckpt", *source, "--num-per-prompt", "2",
                                      "--output", str(tmp_path / "out")])


def test_sample_reads_a_prompt_set_before_loading_the_checkpoint(tmp_path, capsys):
    path = write_coco(tmp_path / "captions_val2017.json", ["a cat", "a dog"])
    assert checked_sample_prompts(sample_args(tmp_path, "--prompt-set", f"coco:{path}")) == ["a cat", "a cat", "a dog", "a dog"]
    with pytest.raises(ValueError, match=r"--prompt-set must be NAME:PATH .*got 'coco'; accepted names: coco, drawbench"):
        checked_sample_prompts(sample_args(tmp_path, "--prompt-set", "coco"))
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "unused.ckpt", "--prompt-set", f"laion:{path}", "--output", str(tmp_path / "o")])
    assert "unknown prompt set 'laion'; accepted: coco, drawbench, hpsv2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "unused.ckpt", "--prompt", "a cat", "--prompt-set", f"coco:{path}",
              "--output", str(tmp_path / "o")])
    assert "not allowed with argument" in capsys.readouterr().err
