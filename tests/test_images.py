import numpy as np
import pandas as pd
import pytest
from PIL import Image

from concepts.datasets import CLASSES
from concepts.errors import InputError
from concepts.images import Preprocess, iter_batches, load_concept_source, load_images, parse_triple


def test_folder_labels_from_subfolders(zoo_dir):
    s = load_images(zoo_dir / "images")
    assert len(s) == 200
    assert set(s.labels) <= set(CLASSES)
    assert all(p.is_file() for p in s.paths)
    assert list(s.table["path"]) == sorted(s.table["path"])  # deterministic order


def test_table_concept_columns(zoo_dir):
    s = load_images(zoo_dir / "concepts" / "images.csv")
    assert "fur" in s.concepts and "watermark" in s.concepts and "label" not in s.concepts
    s2 = load_images(zoo_dir / "concepts" / "images.csv", concept_columns=["fur", "horns"])
    assert s2.concepts == ["fur", "horns"]
    with pytest.raises(InputError, match="'hornz' is not a column.*'horns'"):
        load_images(zoo_dir / "concepts" / "images.csv", concept_columns=["hornz"])


def test_parquet_table(zoo_dir, tmp_path):
    pytest.importorskip("pyarrow")
    df = pd.read_csv(zoo_dir / "concepts" / "images.csv")
    df["path"] = [str((zoo_dir / "concepts" / p).resolve()) for p in df["path"]]  # absolute paths work too
    df.to_parquet(tmp_path / "t.parquet")
    s = load_images(tmp_path / "t.parquet")
    assert len(s) == len(df) and all(p.is_file() for p in s.paths)


def test_tcav_folders(zoo_dir):
    s = load_concept_source(zoo_dir / "tcav")
    assert s.concepts == ["fur", "horns", "stripes"]
    fur = s.table["fur"]
    assert (fur == 1).sum() == 12 and (fur == 0).sum() == 24 and fur.isna().sum() == 24  # others' positives unknown


def test_errors_are_one_line(tmp_path, zoo_dir):
    with pytest.raises(InputError, match="no such file or folder"):
        load_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_images(tmp_path / "empty")
    (tmp_path / "t.csv").write_text("file,label\na.png,cat\n")
    with pytest.raises(InputError, match="no 'path' column"):
        load_images(tmp_path / "t.csv")
    (tmp_path / "t2.csv").write_text("path,label\nmissing.png,cat\n")
    with pytest.raises(InputError, match="missing.png"):
        load_images(tmp_path / "t2.csv")
    # TCAV layout problems
    bad = tmp_path / "tcav"
    (bad / "fur").mkdir(parents=True)
    with pytest.raises(InputError, match="random/"):
        load_concept_source(bad)
    (bad / "random").mkdir()
    Image.new("RGB", (8, 8)).save(bad / "random" / "a.png")
    with pytest.raises(InputError, match="fur.*holds no images"):
        load_concept_source(bad)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    s = load_images(tmp_path)
    with pytest.raises(InputError, match="broken.png"):
        list(iter_batches(s.paths, Preprocess(8), batch_size=2))


def test_preprocess():
    img = Image.new("RGB", (10, 20), (255, 0, 128))
    x = Preprocess(4)(img)
    assert x.shape == (3, 4, 4) and abs(float(x[0].mean()) - 1.0) < 1e-6
    y = Preprocess(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(img)
    assert np.allclose(y.numpy(), ((x - 0.5) / 0.25).numpy())
    assert Preprocess.from_dict(Preprocess(4, (0.1, 0.2, 0.3), (1, 1, 1)).to_dict()) == Preprocess(4, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    with pytest.raises(InputError):
        parse_triple("1,2", "--mean")
    with pytest.raises(InputError):
        Preprocess(4, (0.5, 0.5, 0.5), None)


def test_skip_bad_images_counts_and_warns(tmp_path):
    (tmp_path / "cat").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "cat" / f"ok{i}.png")
    (tmp_path / "cat" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "cat" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 images .*(truncated|empty)"):
        s = load_images(tmp_path, skip_bad=True)
    assert len(s) == 3 and all("ok" in p.name for p in s.paths)
    table = tmp_path / "t.csv"
    pd.DataFrame({"path": ["cat/ok0.png", "cat/gone.png"], "fur": [1, 0]}).to_csv(table, index=False)
    with pytest.raises(InputError, match="gone.png"):
        load_images(table)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert len(load_images(table, skip_bad=True)) == 1
    pd.DataFrame({"path": ["cat/empty.jpg"], "fur": [1]}).to_csv(table, index=False)
    with pytest.raises(InputError, match="none of the 1 images"):
        load_images(table, skip_bad=True)


def test_skip_bad_images_in_tcav_folders_recounts_examples(tmp_path):
    for name, n in (("fur", 3), ("random", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), "blue").save(tmp_path / name / f"{i}.png")
    (tmp_path / "fur" / "bad.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipped 1"):
        s = load_concept_source(tmp_path, skip_bad=True)
    assert (s.table["fur"] == 1).sum() == 3
    with pytest.raises(InputError, match="fur.*1 positive"), pytest.warns(UserWarning):
        for f in list((tmp_path / "fur").glob("[12].png")):
            f.write_bytes(b"junk")
        load_concept_source(tmp_path, skip_bad=True, min_examples=2)
