"""ablate.py: Table 5's four variants trained with the same budget and evaluated, on the tiny fixture model."""
import json

from conftest import IMAGES
from test_train import shards  # noqa: F401  (the fixture: 16 stage-1 samples in 4 shards)

import ablate


def test_table5_command_on_tiny(shards, tmp_path, capsys):  # noqa: F811
    """Stage 1 only, to stay fast (stage 2 from an ablated checkpoint: tests/test_train.py)."""
    for name in ("cat.jpg", "coffee.jpg"):
        (tmp_path / name).write_bytes((IMAGES / name).read_bytes())
    (tmp_path / "qa.json").write_text(json.dumps([
        {"image": "cat.jpg", "question": "What animal?", "answers": ["cat"], "type": "animal"},
        {"image": "coffee.jpg", "question": "How many cups?", "answer": "one", "type": "count"}]))
    (tmp_path / "objects.json").write_text(json.dumps([{"image": "cat.jpg", "objects": ["cat"]},
                                                       {"image": "coffee.jpg", "objects": ["cup"]}]))
    out = tmp_path / "table5"
    rc = ablate.main(["--stage1", shards, "--vqa", str(tmp_path / "qa.json"), "--chair",
                      str(tmp_path / "objects.json"), "--out_dir", str(out), "--vqa-tokens", "2", "--chair-tokens", "3",
                      "--chair-images", "1",
                      "--", "--config", "tiny", "--max_epoch", "1", "--iters_per_epoch", "1", "--batch_size", "2"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "table5.json").read_text())["results"]
    assert list(res) == list(ablate.VARIANTS)
    for name, r in res.items():
        ck = r["checkpoint"]
        assert ck.endswith("stage1/ckpt.pth") and r["vqa"]["n"] == 2 and r["chair"]["long"]["n"] == 1  # --chair-images 1 of 2
        assert r["vqa"]["model"]["ablation"] == {"no_qformer": name == "w/o Q-Former",
                                                 "proj_layers": 3 if name == "+ 3 layers" else 1,
                                                 "train_qformer": name == "+ finetune Q-Former"}
    table = (out / "table5.md").read_text()
    assert "| + finetune Q-Former |" in table and "52.1" in table and "CHAIR_i long" in table
    assert ablate.main(["--stage1", shards, "--variants", "nope", "--out_dir", str(out)]) == 1
