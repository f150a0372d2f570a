"""shapes.py: deterministic scenes, splits disjoint by content, texts that say what the image holds, and files
that the project's own readers (data.py's stage-1 and stage-2 datasets, eval.py) load."""
import json
import random

import numpy as np

import shapes as S


def test_scenes_are_deterministic_and_valid():
    for split in S.SPLITS:
        for i in range(50):
            s = S.scene(split, i)
            assert s == S.scene(split, i)
            assert S.split_of(s) in S.SPLITS[split]
            objs = s["objects"]
            assert 1 <= len(objs) <= 3
            for k in ("shape", "colour", "place"):  # shapes, colours and places differ within a scene
                assert len({o[k] for o in objs}) == len(objs)
    assert np.array_equal(np.asarray(S.render(S.scene("test", 3))), np.asarray(S.render(S.scene("test", 3))))


def test_splits_are_disjoint_by_content():
    keys = {split: {S.scene_key(S.scene(split, i)) for i in range(300)} for split in S.SPLITS}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]


def test_render_puts_each_shape_in_its_place_and_colour():
    s = {"background": "white", "objects": [{"shape": "square", "colour": "red", "size": "large", "place": "top left",
                                             "jitter": (0, 0)}]}
    img = np.asarray(S.render(s)).astype(int)
    cell = S.SIZE // 3
    assert np.abs(img[cell // 2, cell // 2] - S.COLOURS["red"]).max() < 10  # the centre of the top-left cell
    assert np.abs(img[S.SIZE // 2, S.SIZE // 2] - S.BACKGROUNDS["white"]).max() < 10  # the centre: empty


def test_texts_name_every_object():
    s, rng = S.scene("train", 7), random.Random(0)
    for _ in range(6):
        d = S.description(s, rng)
        assert s["background"] in d
        for o in s["objects"]:
            assert o["shape"] in d and o["colour"] in d and o["size"] in d
            assert o["place"].replace("center", "center") in d
    cap = S.caption(s, rng)
    assert all(o["shape"] in cap and o["colour"] in cap for o in s["objects"])


def test_questions_have_true_answers():
    rng = random.Random(1)
    for i in range(200):
        s = S.scene("test", i)
        objs = {o["shape"]: o for o in s["objects"]}
        for t in S.QUESTION_TYPES:
            q, a = S.question(s, t, rng)
            if t == "colour":
                assert objs[q.split()[-1].rstrip("?")]["colour"] == a
            elif t == "position":
                assert objs[q.split()[-1].rstrip("?")]["place"] == a
            elif t == "shape":
                assert any(o["shape"] == a and S.at(o["place"]) in q for o in s["objects"])
            elif t == "count":
                assert a == S.NUMBER[len(objs)]
            else:
                assert a == ("yes" if q.split()[-1].rstrip("?") in objs else "no")


def test_written_files_load_in_the_project_readers(tmp_path):
    import eval as E
    from data import AlignDataset, ShardDataset
    shards = S.write_stage1(tmp_path / "stage1", 12, shard_size=5)
    assert len(shards) == 3
    got = list(ShardDataset(str(tmp_path / "stage1" / "*.tar"), shuffle=0, size=S.SIZE))
    assert len(got) == 12 and got[0]["image"].shape == (3, S.SIZE, S.SIZE) and all(g["text"] for g in got)
    S.write_stage2(tmp_path / "align", 20)
    S.write_stage2(tmp_path / "qa", 20, qa_share=1.0, first=S.QA_FIRST)
    def items(folder):
        ds = AlignDataset(str(tmp_path / folder))
        return [ds[i] for i in range(len(ds))]
    align, qa = items("align"), items("qa")
    assert len(align) == len(qa) == 20 and all(len(it["text"].split()) > 8 for it in align)  # descriptions
    assert all(it["instruction"].endswith("?") for it in qa)  # each question is its annotation's instruction
    assert all(len(it["text"].split()) == 1 or it["text"] in S.PLACES for it in qa)  # a word, or a place
    assert all("<ImageHere>" in it["instruction"] for it in align + qa)
    S.write_eval(tmp_path / "test", 10)
    qs = E.read_items(str(tmp_path / "test" / "eval.json"), ["image", "question", "answers"])
    assert len(qs) == 10 and {q["type"] for q in qs} == set(S.QUESTION_TYPES)
    ims = E.read_items(str(tmp_path / "test" / "eval.json"), ["image", "objects"])
    assert all(o["shape"] in S.SHAPES for im in ims for o in im["objects"])


def test_command_line(tmp_path, capsys):
    assert S.main(["--out", str(tmp_path / "d"), "--stage1", "3", "--stage2", "3", "--test", "5", "--val", "2"]) == 0
    assert json.loads((tmp_path / "d" / "test" / "eval.json").read_text())["questions"]
    assert "1 stage-1 shards" in capsys.readouterr().out
