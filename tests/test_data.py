"""Tests of influence_cli.data: sources, subsets, label noise, transforms, loaders, errors."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import re
import shutil
import struct
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mnist_files import IMAGES, LABELS, MNIST_DIR, requires_mnist
from safetensors.torch import save_file

from influence_cli.config import DataSpec, NormalizeSpec, TransformSpec
from influence_cli.data import IndexedDataset, example_image, load_dataset, make_loader
from influence_cli.errors import ConfigError, DataError

N = 30  # examples in the synthetic IDX files
H = W = 4


# ----------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Writes `array` as an IDX file (gzipped when the name ends in .gz)."""
    codes = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip
    if array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder(">"))
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def synthetic_images(n: int = N) -> np.ndarray:
    """uint8 [n, H, W]; pixel (0, 0) of image i is i, so examples are recognisable."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, H, W), dtype=np.uint8)
    imgs[:, 0, 0] = np.arange(n)
    return imgs


def synthetic_labels(n: int = N) -> np.ndarray:
    return (np.arange(n) % 3).astype(np.uint8)  # 0, 1, 2, 0, 1, 2, ...


@pytest.fixture
def idx_files(tmp_path: Path) -> tuple[Path, Path]:
    images = write_idx(tmp_path / "imgs-idx3-ubyte.gz", synthetic_images())
    labels = write_idx(tmp_path / "labs-idx1-ubyte.gz", synthetic_labels())
    return images, labels


def idx_spec(files: tuple[Path, Path], **kwargs) -> DataSpec:
    return DataSpec(source="idx", images=str(files[0]), labels=str(files[1]), **kwargs)


def error_of(spec: DataSpec, base_dir: Path | str = ".", **kwargs) -> str:
    """The one-line message of load_dataset's error: a DataError, or a ConfigError for a spec that the
    config's checks refuse (a spec built in code is checked as the file's are)."""
    with pytest.raises((DataError, ConfigError)) as info:
        load_dataset(spec, base_dir, **kwargs)
    msg = info.value.message
    assert "\n" not in msg, msg
    return msg


def write_module(tmp_path: Path, body: str) -> str:
    """Writes a factory module into tmp_path; returns its (unique) module name."""
    name = f"user_data_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return name


# ----------------------------------------------------------------------------- idx source


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
def test_idx_reads_images_and_labels(tmp_path: Path, compressed: bool) -> None:
    suffix = ".gz" if compressed else ""
    files = (
        write_idx(tmp_path / f"i{suffix}", synthetic_images()),
        write_idx(tmp_path / f"l{suffix}", synthetic_labels()),
    )
    ds = load_dataset(idx_spec(files), tmp_path)
    assert isinstance(ds, IndexedDataset) and len(ds) == N and ds.name == "data.train"
    x, y, gi = ds[7]
    assert x.shape == (1, H, W) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(synthetic_images()[7]).float())  # raw 0..255 values
    assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == 7 % 3
    assert gi == 7
    assert torch.equal(ds.global_indices, torch.arange(N))
    assert torch.equal(ds.labels, torch.from_numpy(synthetic_labels()).long())
    assert ds.input_shape == (1, H, W) and ds.in_memory


def test_idx_relative_paths_and_other_layouts(tmp_path: Path) -> None:
    vectors = np.arange(N * 5, dtype=np.float32).reshape(N, 5)
    write_idx(tmp_path / "vec.idx", vectors)
    write_idx(tmp_path / "targets.idx", np.linspace(0, 1, N).astype(np.float64))
    ds = load_dataset(DataSpec(source="idx", images="vec.idx", labels="targets.idx"), tmp_path)
    x, y, _ = ds[3]
    assert x.shape == (5,) and torch.equal(x, torch.from_numpy(vectors[3]))  # 2-D IDX: no channel dim added
    assert y.dtype == torch.float64 and ds.labels.dtype == torch.float64  # float labels: regression targets, as stored


@requires_mnist
def test_real_mnist_first_hundred() -> None:
    images, labels = IMAGES, LABELS
    ds = load_dataset(DataSpec(source="idx", images=str(images), labels=str(labels), range=[0, 100]), ".")
    assert len(ds) == 100
    x, _, _ = ds[0]
    assert x.shape == (1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 255
    raw = gzip.decompress(labels.read_bytes())
    assert raw[:4] == b"\x00\x00\x08\x01"
    expected = torch.tensor(list(raw[8:108]), dtype=torch.int64)
    assert torch.equal(ds.labels, expected)
    xb, yb, gb = next(iter(make_loader(ds, 100)))
    assert xb.shape == (100, 1, 28, 28) and torch.equal(yb, expected) and torch.equal(gb, torch.arange(100))
    # the same split through source: mnist, with root pointing at the folder of IDX files
    same = load_dataset(DataSpec(source="mnist", root=str(MNIST_DIR), split="test", range=[0, 100]), ".")
    assert torch.equal(same.labels, expected) and torch.equal(same[5][0], ds[5][0])


# ----------------------------------------------------------------------------- tensors source


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "pt"])
def test_tensors_file_formats(tmp_path: Path, fmt: str) -> None:
    inputs = torch.randn(12, 3, dtype=torch.float64)
    labels = torch.arange(12) % 4
    path = tmp_path / f"data.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({"x": inputs.contiguous(), "y": labels.contiguous()}, str(path))
    elif fmt == "npz":
        np.savez(path, x=inputs.numpy(), y=labels.numpy().astype(np.int32))
    else:
        torch.save({"x": inputs, "y": labels.to(torch.int16)}, path)
    ds = load_dataset(DataSpec(source="tensors", path=str(path), inputs_key="x", labels_key="y"), tmp_path)
    assert len(ds) == 12
    x, y, gi = ds[5]
    assert x.dtype == torch.float64 and torch.equal(x, inputs[5])  # float64 inputs stay float64 (cast to the model dtype in the passes)
    assert y.dtype == torch.int64 and int(y) == 1 and gi == 5


def test_tensors_regression_targets(tmp_path: Path) -> None:
    path = tmp_path / "reg.pt"
    torch.save({"inputs": torch.randn(8, 2), "labels": torch.randn(8)}, path)
    ds = load_dataset(DataSpec(source="tensors", path="reg.pt"), tmp_path)
    assert ds.labels.dtype == torch.float32
    _, yb, _ = next(iter(make_loader(ds, 8)))
    assert yb.shape == (8,) and yb.dtype == torch.float32


# ----------------------------------------------------------------------------- image folder


def write_image_folder(root: Path, sizes: list[tuple[int, int]] | None = None) -> Path:
    from PIL import Image

    sizes = sizes or [(6, 5)] * 5
    k = 0
    for cls, color in (("cat", (250, 10, 10)), ("dog", (10, 10, 250))):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(len(sizes) // 2 + (cls == "cat") * (len(sizes) % 2)):
            h, w = sizes[k]
            k += 1
            Image.new("RGB", (w, h), color).save(root / cls / f"{i}.png")
    return root


def test_image_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs")
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    assert len(ds) == 5 and not ds.in_memory and ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    x, y, gi = ds[4]
    assert x.shape == (3, 6, 5) and x.dtype == torch.float32 and int(y) == 1 and gi == 4
    assert torch.equal(x[:, 0, 0], torch.tensor([10.0, 10.0, 250.0]))
    resized = load_dataset(
        DataSpec(source="image_folder", root=str(root), labels_in=[1], transform=TransformSpec(resize=[3, 2])), "."
    )
    assert len(resized) == 2 and resized.global_indices.tolist() == [3, 4]
    xb, yb, gb = next(iter(make_loader(resized, 4)))  # per-item path, collated by default_collate
    assert xb.shape == (2, 3, 3, 2) and yb.tolist() == [1, 1] and gb.tolist() == [3, 4]
    img = example_image(resized, 0)
    assert img.shape == (3, 3, 2) and torch.allclose(img[:, 0, 0], torch.tensor([10, 10, 250]) / 255.0)


def test_image_folders_share_data_trains_classes(tmp_path: Path) -> None:
    """A query folder without some class keeps every other class's label: each spec numbering its
    own folders would give "dog" label 1 in the query and 2 in training."""
    from PIL import Image

    from influence_cli.config import config_from_dict
    from influence_cli.errors import ConfigError

    train = write_image_folder(tmp_path / "train")
    (train / "cow").mkdir()
    Image.new("RGB", (5, 6), (10, 250, 10)).save(train / "cow" / "0.png")
    query = write_image_folder(tmp_path / "query")  # cat and dog only
    data = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 90, "num_classes": 3}},
        "data": {"train": {"source": "image_folder", "root": "train"}, "query": {"source": "image_folder", "root": "query"}},
    }
    cfg = config_from_dict(data, base_dir=tmp_path)
    assert cfg.data.query.classes == ["cat", "cow", "dog"]
    ds = load_dataset(cfg.data.query, tmp_path, name="data.query")
    assert ds.labels.tolist() == [0, 0, 0, 2, 2] and ds.class_names == ["cat", "cow", "dog"]
    assert load_dataset(cfg.data.train, tmp_path).labels.tolist() == [0, 0, 0, 1, 2, 2]
    (query / "horse").mkdir()
    Image.new("RGB", (5, 6), (0, 0, 0)).save(query / "horse" / "0.png")
    with pytest.raises(DataError, match=r"data.query.root: class folder\(s\) \['horse'\] .* are not among the classes") as info:
        load_dataset(cfg.data.query, tmp_path, name="data.query")
    assert "(data.train's, whose labels the model predicts)" in info.value.message and info.value.hint == "move those folders out (the model has no label for them)"
    later = config_from_dict(data, base_dir=tmp_path)  # a query class data.train lacks: still refused, never renumbered
    assert later.data.query.classes == ["cat", "cow", "dog"]
    vehicles = tmp_path / "vehicles"  # another domain, for dataset-similarity: its own numbering
    for name in ("car", "truck"):
        (vehicles / name).mkdir(parents=True)
        Image.new("RGB", (5, 6), (9, 9, 9)).save(vehicles / name / "0.png")
    other = config_from_dict({**data, "similarity": {"datasets": {"v": {"source": "image_folder", "root": "vehicles"}}}}, base_dir=tmp_path)
    assert other.similarity.datasets["v"].classes is None
    assert load_dataset(other.similarity.datasets["v"], tmp_path, name="similarity.datasets.v").labels.tolist() == [0, 1]
    with pytest.raises(ConfigError, match="data.train.classes: is for source image_folder"):
        config_from_dict({**data, "data": {"train": {"source": "tensors", "path": "x.pt", "classes": ["a"]}}}, base_dir=tmp_path, check_files=False)


def test_image_folder_mixed_sizes_need_resize(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imgs", sizes=[(4, 4), (5, 5), (4, 4), (4, 4)])
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    with pytest.raises(DataError, match=r"data\.train\.transform\.resize"):
        next(iter(make_loader(ds, 4)))
    # sizes that differ only between batches are refused the same way, naming the example
    write_image_folder(tmp_path / "two", sizes=[(4, 4), (4, 4), (5, 5), (5, 5)])  # cat 0, 1 at 4x4; dog at 5x5
    ds = load_dataset(DataSpec(source="image_folder", root="two"), tmp_path)
    with pytest.raises(DataError, match=r"example 2 \(dog/0.png\) has shape \[3, 5, 5\], the first example \[3, 4, 4\]"):
        list(make_loader(ds, 2))


def test_image_folder_skips_hidden_entries_and_counts_other_files(tmp_path: Path) -> None:
    """A hidden folder (.ipynb_checkpoints) was class 0 and shifted every label; hidden files were examples."""
    from PIL import Image

    root = write_image_folder(tmp_path / "imgs")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (5, 6)).save(root / ".ipynb_checkpoints" / "x.png")
    Image.new("RGB", (5, 6)).save(root / "cat" / ".hidden.png")
    (root / "cat" / "._0.png").write_bytes(b"AppleDouble")  # macOS metadata, not an image
    (root / "dog" / "notes.txt").write_text("x")
    Image.new("P", (5, 6)).save(root / "dog" / "anim.gif")
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "1 file of other types (.txt 1) skipped" in ds.source_description
    assert ds[5][0].shape == (3, 6, 5)  # the GIF is read


def test_image_folder_says_what_it_does_not_read(tmp_path: Path, caplog) -> None:
    """Files of other types were dropped without a word; an empty class folder was refused as "no images found", and
    refused as a class folder not among `classes` when left out of them, as the warning of it says to."""
    from PIL import Image

    root = write_image_folder(tmp_path / "imgs")
    Image.new("RGB", (5, 6)).save(root / "dog" / "photo.jfif", format="JPEG")  # another name of JPEG: read
    (root / "dog" / "notes.txt").write_text("x")
    (root / "README.md").write_text("x")
    (root / "zebra").mkdir()
    with caplog.at_level("WARNING", logger="influence_cli"):
        ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    assert ds.class_names == ["cat", "dog", "zebra"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    warned = " ".join(caplog.messages)
    assert "class folder(s) ['zebra']" in warned and "no examples of those classes" in warned
    assert "1 file of other types (.txt 1) in the class folders and 1 file in the root folder itself" in warned and "are not read" in warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):  # as the warning says: classes without the empty folder
        listed = load_dataset(DataSpec(source="image_folder", root="imgs", classes=["cat", "dog"]), tmp_path)
    assert listed.class_names == ["cat", "dog"] and listed.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "zebra" not in " ".join(caplog.messages)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images in the class folders of .*empty' \(1 file of other types \(.txt 1\)\)") as info:
        load_dataset(DataSpec(source="image_folder", root="empty"), tmp_path)
    assert ".jfif" in info.value.hint


def deny_listing(monkeypatch, *folders: Path) -> None:
    """Listing `folders` fails as without read permission (as root, chmod cannot deny it)."""
    denied = {str(f) for f in folders}
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def listing(path=".", _real=real):
            if os.fspath(path) in denied:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return _real(path)

        monkeypatch.setattr(os, name, listing)


@pytest.mark.parametrize("where", ["root", "class folder", "folder in a class folder"])
def test_an_image_folder_this_user_may_not_list_is_named(tmp_path: Path, monkeypatch, where: str) -> None:
    """A folder of an image folder without read permission was a traceback (the root), a class "without images" whose
    examples were left out with a warning, or (below a class folder) left out without a word: now one data error
    naming it. Loading the config (which lists data.train's classes for other image folders) names nothing yet."""
    from influence_cli.config import config_from_dict

    root = write_image_folder(tmp_path / "imgs")
    (root / "dog" / "more").mkdir()
    shutil.copy(root / "dog" / "0.png", root / "dog" / "more" / "0.png")
    other = shutil.copytree(root, tmp_path / "other")  # a similarity dataset's folder, never listable here
    folder = {"root": root, "class folder": root / "dog", "folder in a class folder": root / "dog" / "more"}[where]
    datasets = {"v": {"source": "image_folder", "root": "imgs"}, "w": {"source": "image_folder", "root": "other"}}
    data = {"model": {"architecture": "mlp", "kwargs": {"input_dim": 90, "num_classes": 2}},
            "data": {"train": {"source": "image_folder", "root": "imgs"}}, "similarity": {"datasets": datasets}}  # fmt: skip
    assert len(load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)) == 6
    deny_listing(monkeypatch, folder, other)
    if folder == root:  # the config names it among its problems (its similarity dataset would take its classes)
        with pytest.raises(ConfigError, match=r"data.train.root 'imgs' cannot be listed \(permission denied: give this user read and search"):
            config_from_dict(data, base_dir=tmp_path)
        del data["similarity"]
    cfg = config_from_dict(data, base_dir=tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset(cfg.data.train, tmp_path)
    assert info.value.message == f"data.train.root: folder {str(folder)!r} cannot be read (Permission denied)"
    assert info.value.hint == "give this user read and search permission on it (chmod u+rx)"


# ----------------------------------------------------------------------------- factory source


def test_factory_returning_tensors(tmp_path: Path) -> None:
    mod = write_module(
        tmp_path,
        """
        import torch

        def make(n, dim=3):
            return torch.arange(n * dim, dtype=torch.float32).reshape(n, dim), torch.arange(n) % 2
        """,
    )
    ds = load_dataset(DataSpec(source=f"{mod}:make", kwargs={"n": 10}, range=[4, 10]), tmp_path)
    assert len(ds) == 6 and ds.in_memory and ds.global_indices.tolist() == list(range(4, 10))
    x, y, gi = ds[0]
    assert x.tolist() == [12.0, 13.0, 14.0] and int(y) == 0 and gi == 4


def test_a_factory_that_returns_no_examples_is_named_as_such(tmp_path: Path) -> None:
    mod = write_module(
        tmp_path,
        """
        import torch

        def make(root):
            return torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)
        """,
    )
    with pytest.raises(DataError, match=r"^data.train: the source holds no examples") as err:
        load_dataset(DataSpec(source=f"{mod}:make", kwargs={"root": "images"}), tmp_path)
    assert "resolve against the working folder" in err.value.hint


def test_factory_returning_dataset(tmp_path: Path) -> None:
    mod = write_module(
        tmp_path,
        """
        import torch

        class Squares(torch.utils.data.Dataset):
            def __len__(self):
                return 9

            def __getitem__(self, i):
                return torch.full((2,), float(i)), i % 3

        def make():
            return Squares()
        """,
    )
    ds = load_dataset(DataSpec(source=f"{mod}:make"), tmp_path)
    assert not ds.in_memory and ds.labels is None  # no targets attribute: labels only through items
    x, y, gi = ds[4]
    assert x.tolist() == [4.0, 4.0] and y.dtype == torch.int64 and int(y) == 1 and gi == 4
    batches = list(make_loader(ds, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(9))
    filtered = load_dataset(DataSpec(source=f"{mod}:make", labels_in=[2]), tmp_path)  # labels read from the items
    assert filtered.global_indices.tolist() == [2, 5, 8] and filtered.labels.tolist() == [2, 2, 2]


def test_a_factory_dataset_of_dicts_is_refused_with_its_keys_and_the_fix(tmp_path: Path) -> None:
    """Items {"image": ..., "label": ...} (as Hugging Face datasets give them) name their keys and how to
    return (x, y) instead; an item that is one tensor says what __getitem__ must return."""
    mod = write_module(
        tmp_path,
        """
        import torch

        class Dicts(torch.utils.data.Dataset):
            def __len__(self):
                return 3

            def __getitem__(self, i):
                return {"image": torch.zeros(2), "label": i}

        class Bare(Dicts):
            def __getitem__(self, i):
                return torch.zeros(2)
        """,
    )
    with pytest.raises(DataError) as err:
        load_dataset(DataSpec(source=f"{mod}:Dicts"), tmp_path)[0]
    assert str(err.value.message) == "data.train.source: item 0 is a dict (keys 'image', 'label'), expected a pair (x, y)"
    assert "(item[<input key>], item[<label key>])" in err.value.hint
    with pytest.raises(DataError) as err:
        load_dataset(DataSpec(source=f"{mod}:Bare"), tmp_path)[0]
    assert err.value.message.endswith("is a Tensor, expected a pair (x, y)")
    assert err.value.hint == "the Dataset's __getitem__ must return (input, label)"


def test_a_factory_dataset_with_random_augmentation_is_warned_of(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Items that differ between two reads (a random flip, noise) are warned of once, naming the source; the caller's
    random state is left as it was; items that are the same (NaN included) and items that fail to load are not."""
    import random

    import numpy as np

    mod = write_module(
        tmp_path,
        """
        import random
        import numpy as np
        import torch

        class Augmented(torch.utils.data.Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return torch.full((3,), float(i)) + torch.rand(3) + np.random.rand() + random.random(), i % 2

        class Fixed(Augmented):
            def __getitem__(self, i):
                return torch.tensor([float(i), float("nan")]), i % 2

        class Broken(Augmented):
            def __getitem__(self, i):
                raise OSError("unreadable")
        """,
    )
    with caplog.at_level("WARNING", logger="influence_cli"):
        load_dataset(DataSpec(source=f"{mod}:Augmented"), tmp_path)
    assert f"data.train.source: item 0 of {mod}:Augmented differs between two reads (random augmentation?)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        load_dataset(DataSpec(source=f"{mod}:Fixed"), tmp_path)
        with pytest.raises(DataError, match="item 0 raised OSError: unreadable"):  # the item's own error, as before
            load_dataset(DataSpec(source=f"{mod}:Broken"), tmp_path)
    assert "differs between two reads" not in caplog.text
    import sys

    from influence_cli.data.factory import _warn_if_items_change

    augmented = sys.modules[mod].Augmented()  # imported by load_dataset
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(1).item(), np.random.rand(), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    _warn_if_items_change(augmented, "data.train.source", f"{mod}:Augmented", 4)  # the check's reads leave the random state as it was
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == expected


def test_factory_dataset_with_targets_and_label_noise(tmp_path: Path) -> None:
    mod = write_module(
        tmp_path,
        """
        import torch

        class WithTargets(torch.utils.data.Dataset):
            targets = [i % 2 for i in range(20)]

            def __len__(self):
                return 20

            def __getitem__(self, i):
                return torch.zeros(3), self.targets[i]

        def make():
            return WithTargets()
        """,
    )
    ds = load_dataset(DataSpec(source=f"{mod}:make", label_noise=0.5), tmp_path, seed=3)
    assert 0 < int(ds.noisy_mask.sum()) < 20 and torch.equal(ds.labels != ds.clean_labels, ds.noisy_mask)
    ys = torch.stack([ds[i][1] for i in range(len(ds))])
    assert torch.equal(ys, ds.labels)  # items report the noisy labels
    _, yb, _ = next(iter(make_loader(ds, 20)))
    assert torch.equal(yb, ds.labels)


# ----------------------------------------------------------------------------- torchvision sources


def test_mnist_source_from_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", synthetic_images())
    write_idx(raw / "train-labels-idx1-ubyte", synthetic_labels())
    ds = load_dataset(DataSpec(source="fashion_mnist", root="root", split="train"), tmp_path)
    assert len(ds) == N and ds[0][0].shape == (1, H, W) and ds.class_names[0] == "T-shirt/top"


def test_cifar10_source(tmp_path: Path) -> None:
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(6, 3 * 32 * 32), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [0, 1, 2, 3, 4, 5]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    spec = DataSpec(source="cifar10", root="cifar", split="test", transform=TransformSpec(flatten=True, scale=255.0))
    ds = load_dataset(spec, tmp_path)
    assert len(ds) == 6 and ds.input_shape == (3072,) and ds.labels.tolist() == list(range(6))
    expected = torch.from_numpy(data[2].reshape(3, 32, 32)).float()
    assert torch.allclose(ds[2][0], expected.reshape(-1) / 255.0)
    assert torch.allclose(example_image(ds, 2), expected / 255.0)  # 3072 -> [3, 32, 32]
    assert ds.class_names[1] == "class1"


def test_cifar10_batches_read_without_md5(tmp_path: Path) -> None:
    """torchvision's CIFAR10 refuses batches whose md5 sums are not the archive's (a subset, batches
    pickled again by Python 3 with bytes keys); they are read as the pickles they are."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, size=(3, 3 * 32 * 32), dtype=np.uint8) for _ in range(5)]
    for i, data in enumerate(batches, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": [i, i + 1, i + 2], b"filenames": [b"a.png"] * 3}, f)
    ds = load_dataset(DataSpec(source="cifar10", root="cifar"), tmp_path)
    assert len(ds) == 15 and ds[0][0].shape == (3, 32, 32) and ds.labels.tolist()[:6] == [1, 2, 3, 2, 3, 4]
    assert torch.equal(ds[4][0], torch.from_numpy(batches[1][1].reshape(3, 32, 32)).float())
    assert ds.class_names[3] == "cat"  # no batches.meta: CIFAR-10's names
    with pytest.raises(DataError) as info:  # root names the batches' folder itself
        load_dataset(DataSpec(source="cifar10", root="cifar/cifar-10-batches-py"), tmp_path)
    assert "no CIFAR-10 train split" in info.value.message
    assert "names the cifar-10-batches-py folder itself: point it at the folder that holds cifar-10-batches-py/" in info.value.hint
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"cannot read '.*data_batch_3' as a CIFAR-10 batch"):
        load_dataset(DataSpec(source="cifar10", root="cifar"), tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"expected data_batch_1, .*data_batch_5 in '.*cifar-10-batches-py' \(found only data_batch_1, data_batch_2, data_batch_4, data_batch_5\)"):
        load_dataset(DataSpec(source="cifar10", root="cifar"), tmp_path)


def test_torchvision_missing_files_error(tmp_path: Path) -> None:
    msg = error_of(DataSpec(source="mnist", root=str(tmp_path / "nothing"), split="test"), name="data.query")
    assert msg.startswith("data.query.root: no MNIST test split under") and "expected t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]" in msg
    raw = tmp_path / "data" / "MNIST" / "raw"  # the labels missing, and root pointed at MNIST/ instead of its parent
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", synthetic_images())
    with pytest.raises(DataError, match=r"in '.*/data/MNIST/raw' or '.*/data' \(found only t10k-images-idx3-ubyte\)"):
        load_dataset(DataSpec(source="mnist", root="data", split="test"), tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="mnist", root="data/MNIST", split="test"), tmp_path)
    assert "data.train.root names the MNIST folder itself: point it at the folder that holds MNIST/" in info.value.hint
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="cifar10", root=str(tmp_path)), ".")
    assert "download: true" in info.value.hint


# ----------------------------------------------------------------------------- subsets


def test_subsets_and_global_indices(idx_files: tuple[Path, Path], tmp_path: Path) -> None:
    ds = load_dataset(idx_spec(idx_files, range=[5, 15]), ".")
    assert ds.global_indices.tolist() == list(range(5, 15))
    assert [int(ds[i][0][0, 0, 0]) for i in range(3)] == [5, 6, 7]  # pixel (0, 0) carries the source index
    ds = load_dataset(idx_spec(idx_files, indices=[9, 2, 20]), ".")
    assert ds.global_indices.tolist() == [9, 2, 20] and ds.labels.tolist() == [0, 2, 2]
    (tmp_path / "keep.txt").write_text("# chosen\n4\n\n11\n")
    ds = load_dataset(idx_spec(idx_files, indices_file="keep.txt"), tmp_path)
    assert ds.global_indices.tolist() == [4, 11]
    (tmp_path / "keep.json").write_text(json.dumps([29, 0]))
    ds = load_dataset(idx_spec(idx_files, indices_file="keep.json"), tmp_path)
    assert ds.global_indices.tolist() == [29, 0] and int(ds[0][0][0, 0, 0]) == 29


def test_subset_order_selector_then_labels_then_limit(idx_files: tuple[Path, Path]) -> None:
    ds = load_dataset(idx_spec(idx_files, range=[3, 30], labels_in=[1, 2], limit=5), ".")
    # range keeps 3..29, labels 1 or 2 keeps 4, 5, 7, 8, 10, ...; limit takes the first five of those
    assert ds.global_indices.tolist() == [4, 5, 7, 8, 10]
    assert ds.labels.tolist() == [1, 2, 1, 2, 1]
    ds = load_dataset(idx_spec(idx_files, indices=[27, 3, 1, 0], labels_in=[0], limit=2), ".")
    assert ds.global_indices.tolist() == [27, 3]


def test_position_of(idx_files: tuple[Path, Path]) -> None:
    ds = load_dataset(idx_spec(idx_files, indices=[9, 2, 20, 14]), ".")
    assert ds.position_of(torch.tensor([20, 9, 14])).tolist() == [2, 0, 3]
    assert ds.position_of(torch.tensor([[2, 20]])).shape == (1, 2)
    with pytest.raises(DataError, match=r"data\.train: global indices 3, 5 are not among its 4 examples"):
        ds.position_of(torch.tensor([9, 3, 5]))


# ----------------------------------------------------------------------------- label noise


def test_label_noise_determinism(idx_files: tuple[Path, Path]) -> None:
    spec = idx_spec(idx_files, range=[0, 20], label_noise=0.25)
    a = load_dataset(spec, ".", seed=7)
    b = load_dataset(spec, ".", seed=7)
    c = load_dataset(spec, ".", seed=8)
    clean = torch.from_numpy(synthetic_labels()[:20]).long()
    assert torch.equal(a.clean_labels, clean)
    changed = a.labels != clean
    assert int(changed.sum()) > 0 and torch.equal(changed, a.noisy_mask)  # always a new class
    assert set(a.labels.tolist()) <= {0, 1, 2}
    assert torch.equal(a.labels, b.labels) and a.fingerprint() == b.fingerprint()
    assert not torch.equal(a.labels, c.labels) and a.fingerprint() != c.fingerprint()
    _, yb, _ = next(iter(make_loader(a, 20)))
    assert torch.equal(yb, a.labels)
    assert int(a[int(torch.nonzero(changed)[0])][1]) != int(clean[changed][0])


def test_label_noise_only_among_present_classes(idx_files: tuple[Path, Path]) -> None:
    ds = load_dataset(idx_spec(idx_files, labels_in=[0, 2], label_noise=0.5), ".")
    assert set(ds.labels.tolist()) == {0, 2} and bool(ds.noisy_mask.any())


def test_label_noise_follows_each_examples_global_index(idx_files: tuple[Path, Path]) -> None:
    """Whether an example is flipped, and to which class, depends on its index in the source, not on its
    place in the subset: the same examples in order, reversed, or among more, carry the same labels."""
    kept = [3, 4, 8, 11, 15, 16, 22, 23, 27, 29]

    def by_index(**subset) -> dict[int, tuple[int, bool]]:
        ds = load_dataset(idx_spec(idx_files, label_noise=0.5, **subset), ".", seed=4)
        return {g: (int(y), bool(m)) for g, y, m in zip(ds.global_indices.tolist(), ds.labels, ds.noisy_mask, strict=True)}

    in_order = by_index(indices=kept)
    assert in_order == by_index(indices=kept[::-1])
    assert in_order == {g: v for g, v in by_index(range=[0, N]).items() if g in in_order}
    assert in_order == {g: v for g, v in by_index(range=[0, N], labels_in=[0, 1, 2], limit=N).items() if g in in_order}
    assert 0 < sum(m for _, m in in_order.values()) < len(kept)


def test_label_noise_seed_is_its_own(idx_files: tuple[Path, Path]) -> None:
    """label_noise_seed keeps the labels while `seed` changes (the sampled Fisher's); unset, `seed` draws them."""
    spec = idx_spec(idx_files, label_noise=0.5, label_noise_seed=5)
    fixed = load_dataset(spec, ".", seed=0)
    assert torch.equal(fixed.labels, load_dataset(spec, ".", seed=1).labels)
    assert torch.equal(fixed.labels, load_dataset(idx_spec(idx_files, label_noise=0.5), ".", seed=5).labels)
    assert not torch.equal(fixed.labels, load_dataset(idx_spec(idx_files, label_noise=0.5), ".", seed=0).labels)


def test_label_noise_rate_and_new_classes() -> None:
    """On 100k examples: about p of them flipped, never to their own label, each other class about equally often;
    a stream apart from the sampled Fisher's uniform numbers of the same seed."""
    from influence_cli.data.subsets import apply_label_noise
    from influence_cli.task import counter_uniform

    n, c, p = 100_000, 10, 0.3
    index = torch.arange(n, dtype=torch.int64) * 7 + 12345
    labels = index % c
    noisy, mask = apply_label_noise(labels, index, p, 3, "data.train.label_noise", torch.arange(c))
    assert abs(float(mask.double().mean()) - p) < 0.006  # four standard deviations
    assert torch.equal(noisy != labels, mask)
    for y in range(c):
        moved = noisy[mask & (labels == y)]
        counts = torch.bincount(moved, minlength=c).double()
        assert counts[y] == 0 and bool((counts[torch.arange(c) != y] / moved.numel() - 1 / (c - 1)).abs().lt(0.03).all()), (y, counts)
    fisher = counter_uniform(3, index, 1)[:, 0] < p
    assert abs(float((fisher & mask).double().mean()) / p**2 - 1) < 0.05  # independent: an overlap of p²
    two, _ = apply_label_noise(torch.arange(n) % 2, index, p, 3, "k")  # two classes: always the other one
    assert torch.equal(two[mask], 1 - (torch.arange(n) % 2)[mask])


def test_label_noise_never_flips_to_a_negative_label(tmp_path: Path) -> None:
    """A source that marks unlabeled examples -1 (kept out by the range): a flipped label is one of its classes,
    never -1, which the model would refuse as outside its classes."""
    labels = torch.cat([torch.arange(60) % 3, torch.full((40,), -1)])
    save_file({"inputs": torch.randn(100, 4), "labels": labels}, str(tmp_path / "t.safetensors"))
    ds = load_dataset(DataSpec(source="tensors", path="t.safetensors", range=[0, 60], label_noise=0.5), tmp_path)
    assert int(ds.noisy_mask.sum()) > 10 and set(ds.labels.tolist()) == {0, 1, 2}


def test_a_refusal_names_the_label_noise_that_changed(idx_files: tuple[Path, Path]) -> None:
    """An output whose labels the earlier rule of label_noise drew (recording no label_noise_seed) is refused as that,
    not as labels the user changed; another label_noise_seed (or `seed`, which it defaults to) is named; data without
    label noise records no seed (its fingerprint stays that of earlier versions)."""
    from influence_cli.data.dataset import data_change

    noisy = load_dataset(idx_spec(idx_files, label_noise=0.5), ".", seed=3)
    parts = noisy.fingerprint_parts()
    assert parts["spec"]["subset"]["label_noise_seed"] == 3
    earlier = parts | {"spec": parts["spec"] | {"subset": {k: v for k, v in parts["spec"]["subset"].items() if k != "label_noise_seed"}}}
    earlier["labels"] = "0" * 16  # other labels, drawn by position
    said = data_change(earlier, noisy)
    assert said == (
        "; what changed: the labels label_noise flips (the output's were drawn by an earlier rule, by place in the subset; "
        "each example's is now drawn from label_noise_seed and its index in the source)"
    )
    assert data_change(parts, load_dataset(idx_spec(idx_files, label_noise=0.5), ".", seed=4)) == (
        "; what changed: label_noise_seed: 3 then, 4 now; the labels"
    )
    assert data_change(parts, load_dataset(idx_spec(idx_files, label_noise=0.5, label_noise_seed=3), ".", seed=4)) == ""
    clean = load_dataset(idx_spec(idx_files), ".", seed=3)
    assert "label_noise_seed" not in clean.fingerprint_parts()["spec"]["subset"]
    assert "label_noise: 0.0 then, 0.5 now" in data_change(clean.fingerprint_parts(), noisy)
    assert "label_noise_seed" not in data_change(clean.fingerprint_parts(), noisy)
    assert "label_noise_seed" not in data_change(parts, clean) and "label_noise: 0.5 then, 0.0 now" in data_change(parts, clean)


# ----------------------------------------------------------------------------- transforms


def test_transforms_scale_normalize_flatten_and_example_image(idx_files: tuple[Path, Path]) -> None:
    transform = TransformSpec(scale=255.0, normalize=NormalizeSpec(mean=[0.5], std=[0.25]), flatten=True)
    ds = load_dataset(idx_spec(idx_files, transform=transform), ".")
    raw = torch.from_numpy(synthetic_images()).float()
    x, _, _ = ds[3]
    assert x.shape == (H * W,) and torch.allclose(x, ((raw[3] / 255.0 - 0.5) / 0.25).reshape(-1))
    assert ds.input_shape == (H * W,)
    img = example_image(ds, 3)
    assert img.shape == (1, H, W) and torch.allclose(img[0], raw[3] / 255.0, atol=1e-6)  # 16 -> [1, 4, 4]


@pytest.mark.parametrize("features", [1, 3, 4, 9, 12])
def test_a_few_features_are_no_image(tmp_path: Path, features: int) -> None:
    """3 regression features once drew as a 1x1 RGB swatch, 9 as a 3x3 picture: a flat input is an image from 4x4 up."""
    save_file({"inputs": torch.rand(2, features), "labels": torch.rand(2)}, str(tmp_path / "f.safetensors"))
    ds = load_dataset(DataSpec(source="tensors", path="f.safetensors"), tmp_path)
    with pytest.raises(DataError, match=rf"inputs of {features} values are not a square image .*at least 4x4"):
        example_image(ds, 0)


def test_per_channel_normalize(tmp_path: Path) -> None:
    inputs = torch.rand(4, 3, 2, 2) * 255
    torch.save({"inputs": inputs, "labels": torch.zeros(4, dtype=torch.long)}, tmp_path / "rgb.pt")
    norm = NormalizeSpec(mean=[0.1, 0.2, 0.3], std=[0.5, 1.0, 2.0])
    spec = DataSpec(source="tensors", path="rgb.pt", transform=TransformSpec(scale=255.0, normalize=norm))
    ds = load_dataset(spec, tmp_path)
    mean, std = torch.tensor(norm.mean).view(3, 1, 1), torch.tensor(norm.std).view(3, 1, 1)
    assert torch.allclose(ds[1][0], (inputs[1] / 255.0 - mean) / std, atol=1e-6)
    xb, _, _ = next(iter(make_loader(ds, 4)))
    assert torch.allclose(xb, (inputs / 255.0 - mean) / std, atol=1e-6)
    assert torch.allclose(example_image(ds, 1), inputs[1] / 255.0, atol=1e-5)


def test_example_image_flat_square_and_errors(tmp_path: Path) -> None:
    torch.save({"inputs": torch.rand(3, 64), "labels": torch.zeros(3, dtype=torch.long)}, tmp_path / "a.pt")
    torch.save({"inputs": torch.rand(3, 10), "labels": torch.zeros(3, dtype=torch.long)}, tmp_path / "b.pt")
    ds = load_dataset(DataSpec(source="tensors", path="a.pt"), tmp_path)
    img = example_image(ds, 0)
    assert img.shape == (1, 8, 8) and torch.allclose(img.reshape(-1), ds[0][0])  # values in [0, 1] kept as is
    bad = load_dataset(DataSpec(source="tensors", path="b.pt"), tmp_path, name="data.query")
    with pytest.raises(DataError, match=r"^data\.query: inputs of 10 values"):
        example_image(bad, 0)
    with pytest.raises(DataError, match="position 5"):
        example_image(bad, 5)


# ----------------------------------------------------------------------------- loader


def test_loader_batches_and_fast_path(idx_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset(idx_spec(idx_files, range=[2, 25], transform=TransformSpec(flatten=True)), ".")
    calls = {"getitems": 0}
    original = IndexedDataset.__getitems__

    def counting(self, positions):
        calls["getitems"] += 1
        return original(self, positions)

    monkeypatch.setattr(IndexedDataset, "__getitems__", counting)
    monkeypatch.setattr(IndexedDataset, "__getitem__", lambda self, i: pytest.fail("per-item path used"))
    batches = list(make_loader(ds, 10))
    assert calls["getitems"] == 3 and [len(b[0]) for b in batches] == [10, 10, 3]
    x, y, gi = batches[0]
    assert x.shape == (10, H * W) and x.dtype == torch.float32
    assert y.shape == (10,) and y.dtype == torch.int64 and gi.dtype == torch.int64
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(2, 25))  # never shuffled


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_loader_shards_are_contiguous_disjoint_and_cover(idx_files: tuple[Path, Path], world: int) -> None:
    ds = load_dataset(idx_spec(idx_files, range=[0, 23]), ".")
    seen = []
    for rank in range(world):
        gis = [int(g) for _, _, gb in make_loader(ds, 4, shard=(rank, world)) for g in gb]
        lo, hi = rank * 23 // world, (rank + 1) * 23 // world
        assert gis == list(range(lo, hi))
        seen.extend(gis)
    assert seen == list(range(23))
    with pytest.raises(ValueError):
        make_loader(ds, 4, shard=(2, 2))


def test_loader_with_worker_process(idx_files: tuple[Path, Path]) -> None:
    ds = load_dataset(idx_spec(idx_files), ".")
    gis = torch.cat([gb for _, _, gb in make_loader(ds, 8, num_workers=1)])
    assert gis.tolist() == list(range(N))


def test_loader_fetches_whole_batches(tmp_path: Path, monkeypatch) -> None:
    """In-memory sources are fetched one batch per call (the fast path), never item by item."""
    n = 2000
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8).numpy()
    write_idx(tmp_path / "big-images", images, compress=False)
    write_idx(tmp_path / "big-labels", (np.arange(n) % 10).astype(np.uint8), compress=False)
    spec = DataSpec(
        source="idx", images="big-images", labels="big-labels", transform=TransformSpec(flatten=True, scale=255.0)
    )
    ds = load_dataset(spec, tmp_path)
    calls = {"items": 0, "batches": 0}
    get_item, get_items = type(ds).__getitem__, type(ds).__getitems__

    def count_item(self, p):
        calls["items"] += 1
        return get_item(self, p)

    def count_items(self, ps):
        calls["batches"] += 1
        return get_items(self, ps)

    monkeypatch.setattr(type(ds), "__getitem__", count_item)
    monkeypatch.setattr(type(ds), "__getitems__", count_items)
    count = sum(len(x) for x, _, _ in make_loader(ds, 256))
    assert count == n and calls == {"items": 0, "batches": -(-n // 256)}


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(idx_files: tuple[Path, Path], tmp_path: Path) -> None:
    base = idx_spec(idx_files, range=[0, 20])
    fp = load_dataset(base, ".").fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert load_dataset(base, ".", name="data.query").fingerprint() == fp  # independent of the key
    assert load_dataset(idx_spec(idx_files, range=[0, 20]), tmp_path).fingerprint() == fp
    others = [
        idx_spec(idx_files, range=[0, 19]),
        idx_spec(idx_files, range=[0, 20], labels_in=[0, 1]),
        idx_spec(idx_files, range=[0, 20], limit=10),
        idx_spec(idx_files, indices=list(range(20))[::-1]),
        idx_spec(idx_files, range=[0, 20], transform=TransformSpec(flatten=True)),
        idx_spec(idx_files, range=[0, 20], label_noise=0.1),
    ]
    fps = {load_dataset(spec, ".").fingerprint() for spec in others}
    assert fp not in fps and len(fps) == len(others)
    moved = tmp_path / "moved"  # the same files in another folder (a project copied to another machine)
    moved.mkdir()
    copies = tuple(moved / f.name for f in idx_files)
    for f, c in zip(idx_files, copies, strict=True):
        c.write_bytes(f.read_bytes())
    assert load_dataset(idx_spec(copies, range=[0, 20]), ".").fingerprint() == fp
    write_idx(idx_files[0], synthetic_images(N + 1))  # the same first 20 examples, but the file changed size
    write_idx(idx_files[1], synthetic_labels(N + 1))
    assert load_dataset(base, ".").fingerprint() != fp


# ----------------------------------------------------------------------------- errors


def test_range_outside_source(idx_files: tuple[Path, Path]) -> None:
    msg = error_of(idx_spec(idx_files, range=[0, 200]))
    assert msg == "data.train.range: [0, 200] is outside the 30 examples of imgs-idx3-ubyte.gz"
    for r, hint in (([0, 200], "give a range within [0, 30], e.g. [0, 30]"), ([40, 50], "give a range within [0, 30]")):
        with pytest.raises(DataError) as info:
            load_dataset(idx_spec(idx_files, range=r), ".")
        assert info.value.hint == hint


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"indices": [1, 30]}, r"^data\.train\.indices: index 30 is outside the 30 examples"),
        ({"indices": [1, 4, 1]}, r"^data\.train\.indices: index 1 appears more than once"),
        ({"indices": [1], "range": [0, 2]}, r"^data\.train: use one of range, indices"),
        ({"labels_in": [7]}, r"^data\.train: no examples left after labels_in \[7\]"),
        ({"range": [5, 2]}, r"^data\.train\.range: expected \[start, stop\)"),
        ({"label_noise": 0.1, "labels_in": [2]}, r"^data\.train\.label_noise: label noise needs two or more"),
        ({"transform": TransformSpec(normalize=NormalizeSpec([0.1, 0.2], [1.0, 1.0]))},
         r"^data\.train\.transform\.normalize: 2 values given for inputs with 1 channel \(shape"),
    ],
    ids=["index-out-of-range", "duplicate", "two-selectors", "labels-empty", "bad-range", "noise-one-class",
         "normalize-channels"],
)  # fmt: skip
def test_subset_and_transform_errors(idx_files: tuple[Path, Path], kwargs: dict, pattern: str) -> None:
    assert re.search(pattern, error_of(idx_spec(idx_files, **kwargs)))


def test_normalize_of_the_other_colour_mode_names_the_fix(idx_files: tuple[Path, Path]) -> None:
    """ImageNet's three means on grayscale images (or one on RGB): the hint gives both ways out."""
    with pytest.raises(DataError) as info:
        load_dataset(idx_spec(idx_files, transform=TransformSpec(normalize=NormalizeSpec([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))), ".")
    assert info.value.message.startswith("data.train.transform.normalize: 3 values given for inputs with 1 channel (shape [1, ")
    assert info.value.hint == "give 1 mean and std value, or set data.train.transform.channels: 3 if the model takes RGB images"
    rgb = TransformSpec(channels=3, normalize=NormalizeSpec([0.5, 0.5], [0.5, 0.5]))
    with pytest.raises(DataError) as info:
        load_dataset(idx_spec(idx_files, transform=rgb), ".")
    assert info.value.hint == "give 3 mean and std values (one per channel) or a single one"


def test_indices_file_errors(idx_files: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("1\ntwo\n")
    assert "line 2 of bad.txt" in error_of(idx_spec(idx_files, indices_file="bad.txt"), tmp_path)
    (tmp_path / "far.txt").write_text("1\n99\n")
    assert error_of(idx_spec(idx_files, indices_file="far.txt"), tmp_path).startswith(
        "data.train.indices_file: index 99 is outside the 30 examples"
    )
    (tmp_path / "bad.json").write_text('{"a": 1}')
    assert error_of(idx_spec(idx_files, indices_file="bad.json"), tmp_path).startswith("data.train.indices_file:")
    (tmp_path / "long.json").write_text("[" + "9" * 5000 + "]")  # past Python's 4,300 digits: was a traceback
    assert error_of(idx_spec(idx_files, indices_file="long.json"), tmp_path) == (
        "data.train.indices_file: long.json is not a JSON list of integers Python can read (an integer of more than 4300 digits)"
    )
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # past Python's recursion limit: was a traceback
    assert error_of(idx_spec(idx_files, indices_file="deep.json"), tmp_path).endswith("(nested too deeply)")
    assert error_of(idx_spec(idx_files, indices_file="absent.txt"), tmp_path).startswith("data.train.indices_file:")
    (tmp_path / "huge.txt").write_text("99999999999999999999\n")  # beyond int64: was a traceback
    assert error_of(idx_spec(idx_files, indices_file="huge.txt"), tmp_path).startswith(
        "data.train.indices_file: index 99999999999999999999 is outside the 30 examples"
    )
    with pytest.raises(DataError) as info:
        (tmp_path / "commas.txt").write_text("5,7,9\n")
        load_dataset(idx_spec(idx_files, indices_file="commas.txt"), tmp_path)
    assert "one index per line" in info.value.hint and ".npy" in info.value.hint


def test_an_indices_file_that_is_not_utf8_names_its_byte_and_line(idx_files: tuple[Path, Path], tmp_path: Path) -> None:
    """An indices file saved in Latin-1 or UTF-16 is named with the byte and line that fail, and the fix, as a config
    file is; not Python's codec text. A UTF-8 byte-order mark is no line of its own, and shifts no figure."""
    for name, raw, where in (("latin1.txt", b"1\n# caf\xe9\n2\n", "byte 0xe9 on line 2"),
                             ("bom.json", b"\xef\xbb\xbf[1,\n2, \xff]", "byte 0xff on line 2"),
                             ("utf16.txt", "1\n2\n".encode("utf-16"), "byte 0xff on line 1")):  # fmt: skip
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(DataError) as info:
            load_dataset(idx_spec(idx_files, indices_file=name), tmp_path)
        assert info.value.message == f"data.train.indices_file: {name} is not UTF-8 text ({where})", info.value.message
        assert info.value.hint == "save the file as UTF-8"


def test_an_indices_file_may_be_a_numpy_array(idx_files: tuple[Path, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "keep.npy", np.array([3, 1, 4], dtype=np.int32))
    ds = load_dataset(idx_spec(idx_files, indices_file="keep.npy"), tmp_path)
    assert ds.global_indices.tolist() == [3, 1, 4]
    np.save(tmp_path / "floats.npy", np.array([3.0, 1.0]))
    assert "expected a 1-D integer array" in error_of(idx_spec(idx_files, indices_file="floats.npy"), tmp_path)
    (tmp_path / "text.npy").write_text("3\n1\n")  # not numpy's: it would call it pickled data, to be loaded unsafely
    with pytest.raises(DataError) as info:
        load_dataset(idx_spec(idx_files, indices_file="text.npy"), tmp_path)
    assert info.value.message == "data.train.indices_file: text.npy is not a .npy file (no NumPy header)"
    assert "numpy.save" in info.value.hint and "pickle" not in str(info.value)


def test_idx_file_errors(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "l.gz", synthetic_labels())
    images = write_idx(tmp_path / "i.gz", synthetic_images())
    assert error_of(DataSpec(source="idx", images="missing.gz", labels=str(labels)), tmp_path).startswith(
        "data.train.images: "
    )
    (tmp_path / "corrupt.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    assert "not a valid gzip file" in error_of(DataSpec(source="idx", images="corrupt.gz", labels="l.gz"), tmp_path)
    (tmp_path / "magic").write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    assert error_of(DataSpec(source="idx", images="magic", labels="l.gz"), tmp_path).startswith(
        "data.train.images: magic is not an IDX file"
    )
    full = gzip.decompress(images.read_bytes())
    (tmp_path / "short").write_bytes(full[:-5])
    assert "truncated" in error_of(DataSpec(source="idx", images="short", labels="l.gz"), tmp_path)
    write_idx(tmp_path / "l10", synthetic_labels(10))
    msg = error_of(DataSpec(source="idx", images="i.gz", labels="l10"), tmp_path)
    assert msg == "data.train.labels: l10 has 10 labels but i.gz has 30 images"
    assert error_of(DataSpec(source="idx", labels="l10"), tmp_path).startswith("data.train.images: required")


def test_tensors_file_errors(tmp_path: Path) -> None:
    torch.save({"inputs": torch.zeros(4, 2), "labels": torch.zeros(3)}, tmp_path / "mismatch.pt")
    assert error_of(DataSpec(source="tensors", path="mismatch.pt"), tmp_path).startswith(
        "data.train.labels_key: mismatch.pt has 3 labels"
    )
    np.savez(tmp_path / "keys.npz", a=np.zeros(3))
    msg = error_of(DataSpec(source="tensors", path="keys.npz"), tmp_path)
    assert msg == "data.train.inputs_key: 'inputs' is not in keys.npz (keys: a)"
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert error_of(DataSpec(source="tensors", path="junk.safetensors"), tmp_path).startswith(
        "data.train.path: cannot read junk.safetensors"
    )
    (tmp_path / "junk.pt").write_bytes(b"nope")
    assert error_of(DataSpec(source="tensors", path="junk.pt"), tmp_path).startswith("data.train.path: cannot read")


def test_an_unreadable_tensors_file_is_said_with_the_fix(tmp_path: Path) -> None:
    """An empty file is said to be empty (torch.load says 'EOFError', safetensors 'header too small'), and a file
    no reader can read, empty, truncated or of text, gets a hint naming what to save."""
    for name in ("empty.pt", "empty.safetensors"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError) as info:
            load_dataset(DataSpec(source="tensors", path=name), tmp_path)
        assert info.value.message.startswith(f"data.train.path: cannot read {name} (") and info.value.message.endswith(": the file is empty)")
        assert info.value.hint is not None and info.value.hint.startswith("the file may be truncated or not a tensors file; save a dict")
    (tmp_path / "text.pt").write_text("hello world\n")
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="tensors", path="text.pt"), tmp_path)
    assert info.value.hint == (
        "the file may be truncated or not a tensors file; save a dict of tensors {'inputs': ..., 'labels': ...} (torch.save, safetensors or .npz)"
    )
    (tmp_path / "data.csv").write_text("1,2\n")
    assert "not a .safetensors, .npz, .pt or .pth" in error_of(DataSpec(source="tensors", path="data.csv"), tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    assert "expected a dict of tensors" in error_of(DataSpec(source="tensors", path="list.pt"), tmp_path)


def test_text_labels_are_told_to_be_class_numbers(tmp_path: Path) -> None:
    """Class names (or digits as strings) where class numbers belong: a tensors file's labels, a factory's
    list of labels, a Dataset's items; each error names the fix."""
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    torch.save({"inputs": images, "labels": ["cat", "dog", "cat", "dog"]}, tmp_path / "names.pt")
    np.savez(tmp_path / "names.npz", inputs=images.numpy(), labels=np.array(["7", "2", "1", "0"]))
    mod = write_module(
        tmp_path,
        """
        import torch

        def pair():
            return torch.zeros(4, 3, 8, 8), ["cat", "dog", "cat", "dog"]

        def items():
            return [(torch.zeros(3, 8, 8), "cat") for _ in range(4)]
        """,
    )
    cases = [
        (DataSpec(source="tensors", path="names.pt"), "data.train.labels_key: the labels in names.pt are text ('cat', 'dog', 'cat', ...), not class numbers"),
        (DataSpec(source="tensors", path="names.npz"), "data.train.labels_key: the labels in names.npz are text ('7', '2', '1', ...), not class numbers"),
        (DataSpec(source=f"{mod}:pair"), f"data.train.source: the labels returned by {mod}:pair are not all numbers or tensors of numbers (some are text)"),
        (DataSpec(source=f"{mod}:items"), "data.train.source: item 0: a label must be a number, a list of numbers or a tensor, got str ('cat')"),
    ]
    for spec, message in cases:
        with pytest.raises(DataError) as info:
            load_dataset(spec, tmp_path)
        assert info.value.message == message
        assert info.value.hint == "labels must be class numbers 0, 1, ...: for class names, classes = sorted(set(names)) and label = classes.index(name)"


def test_factory_errors(tmp_path: Path) -> None:
    mod = write_module(
        tmp_path,
        """
        def boom():
            raise ValueError("no data today")

        def wrong():
            return 42

        def mapping():
            import torch
            return {"inputs": torch.zeros(4, 2), "labels": torch.zeros(4)}

        def takes(n):
            return None
        """,
    )
    cases = {
        "no_such_module_xyz:make": "data.train.source: cannot import 'no_such_module_xyz'",
        f"{mod}:missing": f"data.train.source: module '{mod}' has no function 'missing'",
        f"{mod}:boom": f"data.train.source: {mod}:boom raised ValueError: no data today",
        f"{mod}:wrong": f"data.train.source: {mod}:wrong returned a int",
        f"{mod}:mapping": f"data.train.source: {mod}:mapping returned a dict (keys ['inputs', 'labels'])",
        "nocolon": "data.train.source: 'nocolon' is not one of",
    }
    for source, prefix in cases.items():
        assert error_of(DataSpec(source=source), tmp_path).startswith(prefix), source
    assert error_of(DataSpec(source=f"{mod}:takes", kwargs={"m": 1}), tmp_path).startswith("data.train.kwargs:")
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source=f"{mod}:mapings"), tmp_path)
    assert info.value.hint == "did you mean 'mapping'?"


def test_a_factory_import_failure_hints_at_its_cause(tmp_path: Path) -> None:
    """The module beside the config named as a file gets its import name, not "put it beside the config"."""
    mod = write_module(tmp_path, "def make():\n    return [[0.0]], [0]\n")
    needs = write_module(tmp_path, "import no_such_package_xyz\n")

    def hint_of(source: str) -> str:
        with pytest.raises(DataError) as info:
            load_dataset(DataSpec(source=source), tmp_path)
        return info.value.hint

    assert f"{mod}:make" in hint_of(f"{mod}.py:make") and "beside the config file" not in hint_of(f"{mod}.py:make")
    assert hint_of(f"{needs}:make") == f"{needs} imports 'no_such_package_xyz', which is not installed in this Python environment"
    assert hint_of("no_such_module_xyz:make").startswith("put no_such_module_xyz.py beside the config")
    assert len(load_dataset(DataSpec(source=f"{mod}:make"), tmp_path)) == 1
    # an absolute path, or one leading out of the config's folder, is no dotted name of its folders
    assert f": {mod}:make (looked up beside the config" in hint_of(f"{tmp_path / mod}.py:make")
    (tmp_path / "conf").mkdir()
    assert f": {mod}:make (looked up beside the config" in hint_of(f"../{tmp_path.name}/{mod}.py:make")
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source=f"{tmp_path / mod}.py:make"), tmp_path / "conf")
    assert info.value.hint == f"name the module as Python imports it, without its folder and .py: {mod}:make, with {tmp_path} on PYTHONPATH"


def test_a_refusal_of_a_dataset_names_only_what_changed(tmp_path: Path) -> None:
    """`data_change` names a factory's edited module with the note that its size counts, but not when the
    source is another module or another kind (the note would blame an edit that was not made); a source's
    `function` is not named beside `source`; a kwarg that looks like [name, size] is a value, not a file."""
    from influence_cli.data.dataset import data_change

    body = "import torch\n\ndef make(pair=None):\n    return torch.zeros(4, 2), torch.arange(4)\n"
    mod, other = write_module(tmp_path, body), write_module(tmp_path, body + "# another\n")
    parts = load_dataset(DataSpec(source=f"{mod}:make"), tmp_path).fingerprint_parts()
    (tmp_path / f"{mod}.py").write_text(body + "# edited\n")
    edited = data_change(parts, load_dataset(DataSpec(source=f"{mod}:make"), tmp_path))
    assert edited.startswith(f"; what changed: {mod}.py: {len(body)} bytes then, {len(body) + 9} now (the factory's module counts by its size"), edited
    moved = data_change(parts, load_dataset(DataSpec(source=f"{other}:make"), tmp_path))
    assert moved.startswith(f'; what changed: source: "{mod}:make" then, "{other}:make" now; {mod}.py (') and "function" not in moved, moved
    assert "module counts by its size" not in moved, moved
    save_file({"inputs": torch.zeros(4, 2), "labels": torch.arange(4)}, tmp_path / "t.safetensors")
    assert "module counts by its size" not in data_change(parts, load_dataset(DataSpec(source="tensors", path="t.safetensors"), tmp_path))
    spec = DataSpec(source=f"{mod}:make", kwargs={"pair": ["a", 1]})
    kwargs_parts = load_dataset(spec, tmp_path).fingerprint_parts()
    changed = data_change(kwargs_parts, load_dataset(dataclasses.replace(spec, kwargs={"pair": ["a", 2]}), tmp_path))
    assert changed == '; what changed: kwargs.pair: ["a", 1] then, ["a", 2] now', changed


def test_image_folder_errors(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert error_of(DataSpec(source="image_folder", root="empty"), tmp_path).startswith("data.train.root: no images")
    assert error_of(DataSpec(source="image_folder", root="absent"), tmp_path).startswith("data.train.root:")
    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4), 1).save(tmp_path / "flat" / "0.png")  # images without class folders (torchvision: a traceback)
    assert error_of(DataSpec(source="image_folder", root="flat"), tmp_path).endswith("has no class sub-folders (its images lie in the folder itself)")
    (tmp_path / "bare").mkdir()
    assert error_of(DataSpec(source="image_folder", root="bare"), tmp_path).endswith("has no class sub-folders")
    root = write_image_folder(tmp_path / "broken")
    for name in ("c1.png", "c2.png", "zero.png"):  # every unreadable file is named in one run
        (root / "dog" / name).write_bytes(b"" if name == "zero.png" else b"not a png")
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="image_folder", root="broken"), tmp_path)
    dog = root / "dog"
    assert info.value.message == (
        f"data.train.root: cannot read image {str(dog / 'c1.png')!r} (cannot identify image file); 2 of the other 7 images cannot be "
        f"read either: {str(dog / 'c2.png')!r} (cannot identify image file), {str(dog / 'zero.png')!r} (cannot identify image file)"
    )
    assert "remove or replace" in info.value.hint


def test_images_whose_pixels_cannot_be_decoded_are_named_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers are read when the folder opens, pixels only in the pass: a truncated image was found
    one per run, the run stopping at the first."""
    from PIL import Image

    from influence_cli.data import torchvision_sets

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.effect_noise((32, 32), 60).save(root / cls / f"{i}.png")  # noise: the pixel data is most of the file
    for name in ("cat/1.png", "dog/0.png", "dog/3.png"):  # headers intact, pixel data cut
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)  # opens: headers only
    assert ds[0][0].shape == (1, 32, 32)
    with pytest.raises(DataError) as info:
        ds[1]
    message = info.value.message
    assert message.startswith(f"data.train.root: cannot read image {str(root / 'cat' / '1.png')!r}"), message
    truncated = "(image file is truncated)"
    assert message.endswith(f"; 2 of the other 7 images cannot be read either: {str(root / 'dog' / '0.png')!r} {truncated}, {str(root / 'dog' / '3.png')!r} {truncated}")
    assert "remove or replace" in info.value.hint
    subset = load_dataset(DataSpec(source="image_folder", root="imgs", range=(0, 4)), tmp_path)  # the cats: dog/0 and dog/3 are not read
    with pytest.raises(DataError) as info:
        subset[1]
    assert info.value.message.endswith("(image file is truncated); the other 3 images decode"), info.value.message
    (root / "dog" / "0.png").unlink()
    (root / "dog" / "3.png").unlink()
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    with pytest.raises(DataError) as info:
        ds[1]
    assert info.value.message.endswith("(image file is truncated); the other 5 images decode"), info.value.message
    monkeypatch.setattr(torchvision_sets, "DECODE_CHECK_SECONDS", 0.0)  # a large folder: the search stops at its time limit
    with pytest.raises(DataError) as info:
        ds[1]
    assert re.search(r"; (\d) of the other 5 images decode \((\d) not decoded: the search stops after 0 s\)$", info.value.message), info.value.message



def test_a_bad_header_and_truncated_pixels_are_named_in_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header fails when the folder opens, truncated pixels only in the pass: the first run named the bad
    header alone, and the second the truncated images. Now the failed header check decodes the other images'
    pixels too, and one error names each file with what is wrong; past `UNREADABLE_SHOWN` it counts them."""
    from PIL import Image

    from influence_cli.data import torchvision_sets

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.effect_noise((32, 32), 60).save(root / cls / f"{i}.png")
    Image.effect_noise((32, 32), 60).convert("RGB").save(root / "dog" / "4.jpg", quality=95)
    (root / "cat" / "2.png").write_bytes(b"XXXX" + (root / "cat" / "2.png").read_bytes()[4:])  # the PNG signature broken
    for name in ("dog/1.png", "dog/4.jpg"):  # headers intact, pixel data cut
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    dog = root / "dog"
    assert info.value.message.startswith(
        f"data.train.root: cannot read image {str(root / 'cat' / '2.png')!r} (cannot identify image file); 2 of the other 8 images cannot "
        f"be read either: {str(dog / '1.png')!r} (image file is truncated), {str(dog / '4.jpg')!r} (image file is truncated"
    )  # JPEG's adds "(81 bytes not processed)", or so
    assert info.value.exit_code == 3 and "remove or replace" in info.value.hint
    for i in range(4, 10):  # 8 unreadable in all: the first, 5 named, 2 counted
        (root / "cat" / f"{i}.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    assert re.search(r"; 8 of the other 14 images cannot be read either: ('[^']+' \([^)]+\), ){4}'[^']+' \([^)]+\) and 3 more$", info.value.message)
    assert info.value.message.startswith(f"data.train.root: cannot read image {str(root / 'cat' / '2.png')!r} (cannot identify image file)")
    monkeypatch.setattr(torchvision_sets, "DECODE_CHECK_SECONDS", 0.0)  # a large folder: the pixels are decoded for a while only
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    assert "; 6 of the other 14 images cannot be read either (8 not decoded: the search stops after 0 s): " in info.value.message


def test_fit_factors_names_a_bad_header_and_a_truncated_image_at_once_and_writes_nothing(tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from influence_cli.cli import app

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.effect_noise((8, 8), 60).save(root / cls / f"{i}.png")
    (root / "cat" / "0.png").write_bytes(b"GIF89a")  # a header cut short
    data = (root / "dog" / "2.png").read_bytes()
    (root / "dog" / "2.png").write_bytes(data[: len(data) // 2])
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {architecture: mlp, kwargs: {input_dim: 64, hidden: [4], num_classes: 2}}\n"
        "data: {train: {source: image_folder, root: imgs, transform: {scale: 255.0}}, "
        "query: {source: image_folder, root: imgs, transform: {scale: 255.0}}}\n"
        "output_dir: out\n"
    )
    result = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None}).invoke(app, ["fit-factors", str(config)])
    assert result.exit_code == 3, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("data error:")]
    assert "cat/0.png" in error and "dog/2.png' (image file is truncated)" in error and "1 of the other 5 images cannot be read either" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("subset", [{"range": (0, 4)}, {"labels_in": [0]}, {"indices": [0, 2]}, {"limit": 2}], ids=lambda s: next(iter(s)))
def test_a_subsets_first_image_that_fails_to_decode_names_only_the_subsets_others(tmp_path: Path, subset: dict) -> None:
    """The first kept image is read when the dataset loads (for its shape): when its pixels fail, the search
    for the other unreadable images covered the whole folder, naming dog images a cats-only subset never reads."""
    from PIL import Image

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.effect_noise((32, 32), 60).save(root / cls / f"{i}.png")
    for name in ("cat/0.png", "dog/0.png", "dog/3.png"):  # headers intact, pixel data cut
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="image_folder", root="imgs", **subset), tmp_path)
    message = info.value.message
    assert message.startswith(f"data.train.root: cannot read image {str(root / 'cat' / '0.png')!r}"), message
    others = {"range": 3, "labels_in": 3, "indices": 1, "limit": 1}[next(iter(subset))]
    assert message.endswith(f"(image file is truncated); the other {others} images decode"), message

def test_images_pil_fails_on_with_other_errors_than_oserror_are_named(tmp_path: Path) -> None:
    """PIL raises ValueError for a truncated 16-bit PPM's pixels and DecompressionBombError for an image of
    too many pixels: each is named as unreadable (they escaped as tracebacks, also while the other
    images were decoded to name them with a truncated PNG)."""
    import struct
    import zlib

    from PIL import Image

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.effect_noise((32, 32), 60).save(root / cls / f"{i}.png")
    png = (root / "cat" / "1.png").read_bytes()
    (root / "cat" / "1.png").write_bytes(png[: len(png) // 2])  # OSError, in the pass
    (root / "dog" / "9.ppm").write_bytes(b"P6\n32 32\n65535\n" + bytes(32 * 32 * 3))  # half its pixels: ValueError, in the pass
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    with pytest.raises(DataError) as info:
        ds[1]
    assert info.value.message.endswith(f"; 1 of the other 4 images cannot be read either: {str(root / 'dog' / '9.ppm')!r} (not enough image data)"), info.value.message
    with pytest.raises(DataError) as info:
        ds[4]
    assert info.value.message.startswith(f"data.train.root: cannot read image {str(root / 'dog' / '9.ppm')!r} (not enough image data)"), info.value.message

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 4e8 pixels: beyond PIL's limit, refused when opened
    (root / "dog" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)  # headers: read when the folder opens, then the others' pixels
    message = info.value.message
    assert message.startswith(f"data.train.root: cannot read image {str(root / 'cat' / '1.png')!r} (image file is truncated); 2 of the other 5"), message
    assert f"{str(root / 'dog' / 'big.png')!r} (Image size (400000000 pixels) exceeds" in message


def test_image_suffixes_are_torchvisions_gif_and_the_other_jpeg_names() -> None:
    import torchvision.datasets as tvd

    from influence_cli.data import torchvision_sets

    assert set(torchvision_sets._IMAGE_SUFFIXES) == {*tvd.folder.IMG_EXTENSIONS, ".gif", ".jpe", ".jfif"}


def test_a_query_folder_is_read_in_the_colour_mode_of_the_training_folder(tmp_path: Path) -> None:
    """Each folder chose its own mode: a query of grayscale images gave the model 1 channel instead of 3."""
    from PIL import Image

    from influence_cli.config import config_from_dict

    write_image_folder(tmp_path / "train")
    for cls in ("cat", "dog"):
        (tmp_path / "query" / cls).mkdir(parents=True)
        Image.new("L", (5, 6), 80).save(tmp_path / "query" / cls / "0.png")
    data = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 90, "num_classes": 2}},
        "data": {"train": {"source": "image_folder", "root": "train"}, "query": {"source": "image_folder", "root": "query"}},
        "similarity": {"datasets": {"q": {"source": "image_folder", "root": "query"}}},
    }
    cfg = config_from_dict(data, base_dir=tmp_path)
    for spec, key in ((cfg.data.query, "data.query"), (cfg.similarity.datasets["q"], "similarity.datasets.q")):
        x = load_dataset(spec, tmp_path, name=key)[0][0]
        assert x.shape == (3, 6, 5) and x[:, 0, 0].tolist() == [80.0, 80.0, 80.0], key
    assert load_dataset(DataSpec(source="image_folder", root="query"), tmp_path)[0][0].shape == (1, 6, 5)  # alone: grayscale
    swapped = config_from_dict({**data, "data": {"train": {"source": "image_folder", "root": "query"},
                                                 "query": {"source": "image_folder", "root": "train"}}}, base_dir=tmp_path)  # fmt: skip
    assert load_dataset(swapped.data.query, tmp_path, name="data.query")[0][0].shape == (1, 6, 5)  # colour query of a grayscale model
    assert "colour_of" not in json.dumps(cfg.to_dict())  # internal: not a key of the config


def test_label_noise_needs_class_labels(tmp_path: Path) -> None:
    torch.save({"inputs": torch.zeros(6, 2), "labels": torch.rand(6)}, tmp_path / "reg.pt")
    msg = error_of(DataSpec(source="tensors", path="reg.pt", label_noise=0.5), tmp_path)
    assert msg.startswith("data.train.label_noise: label noise needs one integer class label per example (classification), got torch.float32")
    msg = error_of(DataSpec(source="tensors", path="reg.pt", labels_in=[1]), tmp_path)
    assert msg.startswith("data.train.labels_in: needs one integer class label per example, the source has torch.float32 labels")
    torch.save({"inputs": torch.zeros(6, 2), "labels": torch.zeros(6, 4, dtype=torch.int64)}, tmp_path / "tokens.pt")  # a language model's
    msg = error_of(DataSpec(source="tensors", path="tokens.pt", label_noise=0.5), tmp_path)
    assert "got labels of shape [4] per example" in msg
    msg = error_of(DataSpec(source="tensors", path="tokens.pt", labels_in=[1]), tmp_path)
    assert "torch.int64 labels of shape [4] per example" in msg


def test_resize_needs_images(tmp_path: Path) -> None:
    torch.save({"inputs": torch.zeros(6, 5), "labels": torch.zeros(6, dtype=torch.long)}, tmp_path / "v.pt")
    msg = error_of(DataSpec(source="tensors", path="v.pt", transform=TransformSpec(resize=[2, 2])), tmp_path)
    assert msg.startswith("data.train.transform.resize: inputs of shape [5] are not images")


# ----------------------------------------------------------------------------- what the files really hold


def test_factory_targets_are_used_only_when_the_items_carry_them(tmp_path: Path) -> None:
    """A dataset may keep raw `targets` while its items carry other labels (target_transform,
    relabelling): the items' labels win."""
    mod = write_module(
        tmp_path,
        """
        import torch

        class Relabelled(torch.utils.data.Dataset):
            targets = list(range(8))

            def __init__(self, with_transform):
                self.target_transform = (lambda y: int(y >= 4)) if with_transform else None

            def __len__(self):
                return 8

            def __getitem__(self, i):
                return torch.zeros(2), int(self.targets[i] >= 4)

        def make(with_transform=False):
            return Relabelled(with_transform)
        """,
    )
    for kwargs in ({}, {"with_transform": True}):
        ds = load_dataset(DataSpec(source=f"{mod}:make", kwargs=kwargs), tmp_path)
        _, yb, _ = next(iter(make_loader(ds, 8)))
        assert yb.tolist() == [0, 0, 0, 0, 1, 1, 1, 1], kwargs


def test_image_folder_colour_and_depth(tmp_path: Path) -> None:
    """One grayscale image first no longer turns the colour images gray; 16-bit images are refused, not clipped."""
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.new("L", (4, 4), 100).save(root / "a" / "0.png")
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "a" / "1.png")
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    assert ds[0][0].shape == (3, 4, 4) and ds[1][0][:, 0, 0].tolist() == [255.0, 0.0, 0.0]
    assert ds[0][0][:, 0, 0].tolist() == [100.0, 100.0, 100.0]
    Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(root / "a" / "2.png")
    with pytest.raises(DataError, match=r"2.png' is an I;16 image \(16-bit or float\)"):
        load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)


def test_image_folder_fingerprint_sees_a_replaced_image(tmp_path: Path) -> None:
    from PIL import Image

    root = write_image_folder(tmp_path / "imgs")
    before = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path).fingerprint()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(root / "cat" / "0.png")
    assert load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path).fingerprint() != before


def test_an_image_folders_fingerprint_holds_the_colour_mode_it_is_read_in(tmp_path: Path) -> None:
    """A folder that took data.train's colour mode and then its own (classes of its own) was the same
    dataset by its fingerprint: its finished similarity and spectrum results were shown as current."""
    from PIL import Image

    from influence_cli.config import config_from_dict

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("L", (5, 6), 80).save(tmp_path / "train" / cls / "0.png")
    write_image_folder(tmp_path / "colour")
    own = load_dataset(DataSpec(source="image_folder", root="colour"), tmp_path)
    q = {"source": "image_folder", "root": "colour", "transform": {"channels": 1}}
    data = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 30, "num_classes": 2}},
        "data": {"train": {"source": "image_folder", "root": "train"}},
        "similarity": {"datasets": {"q": q}},
    }
    took = config_from_dict(data, base_dir=tmp_path).similarity.datasets["q"]
    mine = config_from_dict({**data, "similarity": {"datasets": {"q": {**q, "classes": ["cat", "dog"]}}}}, base_dir=tmp_path).similarity.datasets["q"]
    assert took.classes == mine.classes == ["cat", "dog"] and took.colour_of is not None and mine.colour_of is None
    gray, rgb = (load_dataset(spec, tmp_path, name="similarity.datasets.q") for spec in (took, mine))
    assert gray[0][0].shape == rgb[0][0].shape == (1, 6, 5)  # the same shape as the model takes it, other values
    assert gray._canonical["files"]["colour"] == "grayscale" and rgb._canonical["files"]["colour"] == "RGB"
    assert gray.fingerprint() != rgb.fingerprint()
    assert rgb.fingerprint() != own.fingerprint()  # the channels transform is part of the spec
    assert load_dataset(DataSpec(source="image_folder", root="colour", transform=TransformSpec(channels=1)), tmp_path).fingerprint() == rgb.fingerprint()


def test_fingerprints_of_other_sources_keep_their_values(tmp_path: Path) -> None:
    """The image folders' colour mode left every other source's fingerprint as it was: outputs of
    IDX files and tensors files written before stay valid. A changed value here refuses them all."""
    write_idx(tmp_path / "imgs-idx3-ubyte", synthetic_images())
    write_idx(tmp_path / "labs-idx1-ubyte", synthetic_labels())
    spec = DataSpec(source="idx", images="imgs-idx3-ubyte", labels="labs-idx1-ubyte", range=[0, 20])
    assert load_dataset(spec, tmp_path).fingerprint() == "d538ee1d3677e80f"
    save_file({"inputs": torch.arange(24, dtype=torch.float32).reshape(6, 4), "labels": torch.tensor([0, 1, 0, 1, 0, 1])}, tmp_path / "t.safetensors")
    assert load_dataset(DataSpec(source="tensors", path="t.safetensors"), tmp_path).fingerprint() == "3ff2584ea90740e0"


def test_a_set_in_a_factorys_kwargs_draws_the_same_data_in_every_process(tmp_path: Path) -> None:
    """A set of names in kwargs (YAML's !!set, or the Python API's) was hashed as Python wrote it, its strings in an
    order that changes with every process: an unseeded factory drew other data in each command and on each torchrun
    rank, and each command's fingerprint refused the last one's outputs. A set of small ints keeps its text."""
    import subprocess
    import sys

    from launch import subprocess_env

    from influence_cli.storage import canonical_json

    mod = write_module(
        tmp_path,
        """
        import torch
        from torch.utils.data import TensorDataset

        def make(n, tags):
            return TensorDataset(torch.randn(n, 3), torch.arange(n) % len(tags))
        """,
    )
    code = (
        "import sys, torch\nfrom influence_cli.data import load_dataset\n"
        f"ds = load_dataset({{'source': '{mod}:make', 'kwargs': {{'n': 8, 'tags': {{'cat', 'dog', 'bird', 'eel', 'fox'}}}}}}, sys.argv[1])\n"
        "print(ds.fingerprint(), torch.stack([ds[i][0] for i in range(8)]).sum().item())"
    )
    seen = set()
    for hash_seed in ("1", "2", "3"):
        env = {**subprocess_env(), "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        seen.add(run.stdout.strip())
    assert len(seen) == 1, seen
    assert canonical_json({"a": {3, 1, 2}, "b": frozenset({"y", "x"}), "c": set()}) == (
        '{"a": "{1, 2, 3}", "b": "frozenset({\'x\', \'y\'})", "c": "set()"}'
    )


def test_image_folder_with_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    """b"\\xff.png" (a name from another system's encoding) crashed the fingerprint: "surrogates not allowed"."""
    root = write_image_folder(tmp_path / "imgs")
    os.rename(root / "cat" / "0.png", os.path.join(os.fsencode(root / "cat"), b"\xff.png"))
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    assert len(ds) == 5 and len(ds.fingerprint()) > 0


def test_fashion_mnist_is_not_read_from_mnist_files_beside_it(tmp_path: Path) -> None:
    """MNIST and FashionMNIST share file names: torchvision's <Class>/raw folder comes first."""
    root = tmp_path / "root"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", synthetic_images())
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(N, dtype=np.uint8))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", synthetic_images())
    write_idx(raw / "train-labels-idx1-ubyte", synthetic_labels())
    ds = load_dataset(DataSpec(source="fashion_mnist", root="root", split="train"), tmp_path)
    assert ds.labels.tolist() == synthetic_labels().tolist()
    # the flat files are MNIST's layout only: FashionMNIST never reads them (it read digits as clothes)
    shutil.rmtree(raw)
    with pytest.raises(DataError, match="no FashionMNIST train split under") as exc:
        load_dataset(DataSpec(source="fashion_mnist", root="root", split="train"), tmp_path)
    assert "a flat folder of FashionMNIST IDX files reads with source: idx" in exc.value.hint
    assert load_dataset(DataSpec(source="mnist", root="root", split="train"), tmp_path).labels.tolist() == [0] * N


def test_resize_refuses_channels_last_inputs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"inputs": torch.zeros(4, 8, 6, 3), "labels": torch.zeros(4, dtype=torch.int64)}, tmp_path / "d.safetensors")
    spec = DataSpec(source="tensors", path="d.safetensors", transform=TransformSpec(resize=[4, 3]))
    assert "look channels-last ([H, W, C])" in error_of(spec, tmp_path)


def test_factory_pil_images_show_their_colours(tmp_path: Path) -> None:
    mod = write_module(
        tmp_path,
        """
        from PIL import Image

        def make():
            pal = Image.new("P", (2, 2))
            pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
            rgba = Image.new("RGBA", (2, 2), (0, 255, 0, 128))
            return [(pal, 0), (rgba, 1)]
        """,
    )
    ds = load_dataset(DataSpec(source=f"{mod}:make"), tmp_path)
    assert ds[0][0].shape == (3, 2, 2) and ds[0][0][:, 0, 0].tolist() == [255.0, 0.0, 0.0]
    assert ds[1][0].shape == (3, 2, 2) and ds[1][0][:, 0, 0].tolist() == [0.0, 255.0, 0.0]


def test_a_factory_gives_regression_targets_as_lists_of_numbers(tmp_path: Path) -> None:
    """Rows of targets as Python lists (a data frame's .values.tolist()), returned beside the inputs or in a
    Dataset's items, were refused as "not all numbers" (the inputs were read from the same lists)."""
    mod = write_module(
        tmp_path,
        """
        import torch

        ROWS = [[float(i), 2.0 * i, -1.0] for i in range(6)]

        def pair():
            return [[float(i), 1.0] for i in range(6)], ROWS

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 6

            def __getitem__(self, i):
                return [float(i), 1.0], tuple(ROWS[i])

        def items():
            return Items()

        def ragged():
            return [[float(i), 1.0] for i in range(6)], [[1.0] * (1 + i % 2) for i in range(6)]
        """,
    )
    for source in ("pair", "items"):
        ds = load_dataset(DataSpec(source=f"{mod}:{source}"), tmp_path)
        labels = torch.stack([ds[i][1] for i in range(len(ds))])
        assert labels.dtype == torch.float32 and labels.shape == (6, 3), source
        assert ds[4][1].tolist() == [4.0, 8.0, -1.0] and ds[4][0].tolist() == [4.0, 1.0], source
    with pytest.raises(DataError, match="the labels returned by .*ragged differ in shape"):
        load_dataset(DataSpec(source=f"{mod}:ragged"), tmp_path)


def test_factory_returning_lists_of_inputs_and_labels(tmp_path: Path) -> None:
    """(list of inputs, list of labels) is stacked into a dataset, not taken for two (x, y) items."""
    mod = write_module(
        tmp_path,
        """
        import numpy as np
        import torch

        def make():
            return [torch.full((3,), float(i)) for i in range(12)], [i % 3 for i in range(12)]

        def pairs():
            return [(torch.zeros(3), 0), (torch.ones(3), 1)]

        def tensor_labels():
            return [torch.full((3,), float(i)) for i in range(12)], [torch.tensor(i % 3) for i in range(12)]

        def vector_targets():
            return [torch.full((3,), float(i)) for i in range(12)], [torch.full((2,), i / 2) for i in range(12)]

        def tensor_pairs():
            return [(torch.zeros(3), torch.tensor(0)), (torch.ones(3), torch.tensor(1))]

        def zipped():
            pairs = [(torch.full((3,), float(i)), torch.tensor(i % 3)) for i in range(12)]
            return list(zip(*pairs))

        def id_lists():
            return [[i, i + 1, 0] for i in range(5)], [torch.tensor(i % 2) for i in range(5)]

        def list_and_tensor():
            return [torch.full((2,), float(i)) for i in range(6)], torch.arange(6) % 2

        def ambiguous():
            return [[torch.zeros(2), torch.ones(2)], [torch.ones(2), torch.zeros(2)]]

        def two_scalar_items():
            return [(0.5, 1), (0.25, 0)]

        def pil_images():
            from PIL import Image

            return [Image.new("L", (4, 4), i * 40) for i in range(5)], [i % 2 for i in range(5)]

        def ragged():
            return [torch.arange(i + 1) for i in range(5)], [i % 2 for i in range(5)]

        def unequal():
            return [torch.zeros(3) for _ in range(5)], [i % 2 for i in range(4)]

        def words():
            return [torch.zeros(3) for _ in range(5)], ["cat", "dog", "cat", "dog", "cat"]

        def nothing():
            return [], []

        class Listed(list, torch.utils.data.Dataset):
            pass

        def tensor_and_list():
            return torch.arange(6.0).reshape(3, 2), [0, 1, 0]

        def numpy_and_list():
            return np.zeros((3, 2)), [0, 1, 0]

        def one_zero():
            return torch.zeros(1, 2), [1]

        def numpy_0d_labels():
            return [torch.full((2,), float(i)) for i in range(4)], [np.array(i % 2) for i in range(4)]

        def numpy_bool_labels():
            return [torch.full((2,), float(i)) for i in range(4)], [np.bool_(i % 2) for i in range(4)]

        def scalar_features():
            return [0.1, 0.2, 0.3, 0.4, 0.5], [0, 1, 0, 1, 0]

        def huge_label():
            return [torch.zeros(2) for _ in range(4)], [0, 1, 2, 2**70]

        class FirstTwo(torch.utils.data.TensorDataset):
            def __len__(self):
                return 2

        def tensor_dataset_subclass():
            return FirstTwo(torch.arange(8.0).reshape(4, 2), torch.arange(4))

        def list_dataset():
            return Listed([(torch.ones(2), torch.zeros(2)), (torch.ones(2) * 2, torch.ones(2))])
        """,
    )
    ds = load_dataset(DataSpec(source=f"{mod}:make"), tmp_path)
    assert len(ds) == 12 and ds.labels.tolist() == [i % 3 for i in range(12)] and ds[5][0].tolist() == [5.0, 5.0, 5.0]
    two = load_dataset(DataSpec(source=f"{mod}:pairs"), tmp_path)
    assert len(two) == 2 and two[1][0].tolist() == [1.0, 1.0, 1.0] and int(two[1][1]) == 1
    ids = load_dataset(DataSpec(source=f"{mod}:tensor_labels", range=[0, 12]), tmp_path)
    assert len(ids) == 12 and ids.labels.dtype == torch.int64 and ids.labels.tolist() == [i % 3 for i in range(12)]
    targets = load_dataset(DataSpec(source=f"{mod}:vector_targets"), tmp_path)
    assert len(targets) == 12 and targets.labels.shape == (12, 2) and targets.labels[5].tolist() == [2.5, 2.5]
    zipped = load_dataset(DataSpec(source=f"{mod}:zipped"), tmp_path)
    assert len(zipped) == 12 and zipped.labels.tolist() == [i % 3 for i in range(12)] and zipped[4][0].tolist() == [4.0] * 3
    ids = load_dataset(DataSpec(source=f"{mod}:id_lists"), tmp_path)
    assert len(ids) == 5 and ids.labels.tolist() == [0, 1, 0, 1, 0] and ids[3][0].tolist() == [3.0, 4.0, 0.0]
    mixed = load_dataset(DataSpec(source=f"{mod}:list_and_tensor"), tmp_path)
    assert len(mixed) == 6 and mixed[5][0].tolist() == [5.0, 5.0] and int(mixed[5][1]) == 1
    for both_ways in ("ambiguous", "two_scalar_items"):  # (inputs, labels) of 2 examples, or 2 (x, y) items
        with pytest.raises(DataError, match="returned two sequences that read both as") as err:
            load_dataset(DataSpec(source=f"{mod}:{both_ways}"), tmp_path)
        assert "return a tuple of two tensors" in err.value.hint
    pil = load_dataset(DataSpec(source=f"{mod}:pil_images"), tmp_path)
    assert len(pil) == 5 and pil[2][0].shape == (1, 4, 4) and float(pil[2][0].max()) == 80.0
    listed = load_dataset(DataSpec(source=f"{mod}:list_dataset"), tmp_path)  # a Dataset: its items, never a pair
    assert len(listed) == 2 and listed[1][0].tolist() == [2.0, 2.0] and listed[1][1].tolist() == [1.0, 1.0]
    pair = load_dataset(DataSpec(source=f"{mod}:tensor_and_list"), tmp_path)
    assert len(pair) == 3 and pair[2][0].tolist() == [4.0, 5.0] and pair.labels.tolist() == [0, 1, 0]
    assert len(load_dataset(DataSpec(source=f"{mod}:numpy_and_list"), tmp_path)) == 3
    assert len(load_dataset(DataSpec(source=f"{mod}:one_zero"), tmp_path)) == 1
    zero_d = load_dataset(DataSpec(source=f"{mod}:numpy_0d_labels"), tmp_path)
    assert zero_d.labels.shape == (4,) and zero_d.labels.tolist() == [0, 1, 0, 1]
    assert load_dataset(DataSpec(source=f"{mod}:numpy_bool_labels"), tmp_path).labels.tolist() == [0, 1, 0, 1]
    scalars = load_dataset(DataSpec(source=f"{mod}:scalar_features"), tmp_path)
    assert len(scalars) == 5 and scalars.labels.tolist() == [0, 1, 0, 1, 0]
    assert len(load_dataset(DataSpec(source=f"{mod}:tensor_dataset_subclass"), tmp_path)) == 2  # its own __len__
    for bad, needle in (
        ("huge_label", "cannot form one tensor"),
        ("ragged", r"the inputs returned by .* differ in shape \(example 0: \[1\], example 1: \[2\]\)\n"),  # then the hint
        ("unequal", "returned 5 inputs but 4 labels"),
        ("words", "the labels returned by .* are not all numbers"),
        ("nothing", "returned no examples"),
    ):
        with pytest.raises(DataError, match=needle):
            load_dataset(DataSpec(source=f"{mod}:{bad}"), tmp_path)
    with pytest.raises(DataError) as err:  # token ids of several lengths: padded by the factory, with data.padding_value set
        load_dataset(DataSpec(source=f"{mod}:ragged"), tmp_path)
    assert err.value.hint == f"pad the sequences to one length in {mod}:ragged and set data.padding_value to the pad id"
    items = load_dataset(DataSpec(source=f"{mod}:tensor_pairs"), tmp_path)
    assert len(items) == 2 and items[1][0].tolist() == [1.0, 1.0, 1.0] and int(items[1][1]) == 1


def test_data_factories_of_the_same_name_in_two_folders(tmp_path: Path) -> None:
    """Two configs in two folders may both name `my_data:make`: each gets its own module."""
    for sub, n in (("a", 3), ("b", 5)):
        folder = tmp_path / sub
        folder.mkdir()
        (folder / "my_data_same_name.py").write_text(f"import torch\n\ndef make():\n    return torch.zeros({n}, 2), torch.zeros({n}, dtype=torch.int64)\n")
        assert len(load_dataset(DataSpec(source="my_data_same_name:make"), folder)) == n


def test_a_data_error_in_a_loader_worker_keeps_its_message_and_hint(tmp_path: Path) -> None:
    """torch re-raises a worker's exception built from its formatted traceback; the loader raises the error itself."""
    import pickle as _pickle

    error = DataError("data.train: broken", hint="fix it")
    again = _pickle.loads(_pickle.dumps(error))
    assert type(again) is DataError and again.message == "data.train: broken" and again.hint == "fix it"
    write_image_folder(tmp_path / "imgs", sizes=[(4, 4), (4, 4), (5, 5), (5, 5)])
    ds = load_dataset(DataSpec(source="image_folder", root="imgs"), tmp_path)
    with pytest.raises(DataError) as exc:
        list(make_loader(ds, 2, num_workers=1))
    assert str(exc.value).startswith("data.train.transform.resize: example 2 (dog/0.png) has shape") and "Traceback" not in str(exc.value)
    assert exc.value.hint and "resize" in exc.value.hint


def test_index_files_with_a_byte_order_mark_and_digit_separators(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"inputs": torch.zeros(10, 2), "labels": torch.arange(10)}, tmp_path / "d.safetensors")
    (tmp_path / "bom.txt").write_bytes("\ufeff4\n2\n".encode())
    ds = load_dataset(DataSpec(source="tensors", path="d.safetensors", indices_file="bom.txt"), tmp_path)
    assert ds.global_indices.tolist() == [4, 2]
    (tmp_path / "sep.txt").write_text("1_0\n")
    assert "line 1 of sep.txt is '1_0', not an integer" in error_of(DataSpec(source="tensors", path="d.safetensors", indices_file="sep.txt"), tmp_path)


def test_channels_last_images_with_a_channel_normalize_say_so(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"inputs": torch.zeros(4, 8, 8, 3), "labels": torch.zeros(4, dtype=torch.int64)}, tmp_path / "d.safetensors")
    spec = DataSpec(source="tensors", path="d.safetensors", transform=TransformSpec(normalize=NormalizeSpec(mean=[0.5] * 3, std=[0.2] * 3)))
    with pytest.raises(DataError, match=r"they look channels-last \(\[H, W, C\]\)") as exc:
        load_dataset(spec, tmp_path)
    assert exc.value.hint == "set data.train.transform.channels_first: true"
    fixed = dataclasses.replace(spec, transform=dataclasses.replace(spec.transform, channels_first=True))
    ds = load_dataset(fixed, tmp_path)
    assert ds.input_shape == (3, 8, 8) and ds[0][0].shape == (3, 8, 8)
    first = torch.arange(2 * 4 * 5 * 3, dtype=torch.float32).reshape(2, 4, 5, 3)
    save_file({"inputs": first, "labels": torch.zeros(2, dtype=torch.int64)}, tmp_path / "e.safetensors")
    moved = load_dataset(DataSpec(source="tensors", path="e.safetensors", transform=TransformSpec(channels_first=True)), tmp_path)
    assert torch.equal(moved[1][0], first[1].permute(2, 0, 1))
    plain = load_dataset(DataSpec(source="tensors", path="e.safetensors"), tmp_path)
    assert moved.fingerprint() != plain.fingerprint()
    from influence_cli.data.dataset import example_image  # top-k --image-grid: the image as the model sees it, resized too

    resized = load_dataset(DataSpec(source="tensors", path="e.safetensors", transform=TransformSpec(channels_first=True, resize=[8, 8])), tmp_path)
    assert example_image(resized, 1).shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"transform.channels_first: inputs of shape \[4, 5, 3, 1\] are not \[H, W, C\] images"):
        save_file({"inputs": torch.zeros(2, 4, 5, 3, 1), "labels": torch.zeros(2, dtype=torch.int64)}, tmp_path / "f.safetensors")
        load_dataset(DataSpec(source="tensors", path="f.safetensors", transform=TransformSpec(channels_first=True)), tmp_path)
    save_file({"inputs": torch.zeros(2, 1, 8, 8), "labels": torch.zeros(2, dtype=torch.int64)}, tmp_path / "g.safetensors")
    with pytest.raises(DataError, match=r"transform.channels_first: inputs of shape \[1, 8, 8\] are channels first already"):
        load_dataset(DataSpec(source="tensors", path="g.safetensors", transform=TransformSpec(channels_first=True)), tmp_path)


def test_a_tensors_file_of_pickled_objects_says_what_to_save(tmp_path: Path) -> None:
    torch.save(torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4)), tmp_path / "tds.pt")
    with pytest.raises(DataError) as exc:
        load_dataset(DataSpec(source="tensors", path="tds.pt"), tmp_path)
    assert "(not a tensor)" in exc.value.message and "\x1b" not in exc.value.message and "\n" not in exc.value.message
    assert exc.value.hint.startswith("save a dict of tensors {'inputs': ..., 'labels': ...}")


def test_swapped_idx_images_and_labels_are_named(tmp_path: Path) -> None:
    write_idx(tmp_path / "images.idx", synthetic_images())
    write_idx(tmp_path / "labels.idx", synthetic_labels())
    msg = error_of(DataSpec(source="idx", images="labels.idx", labels="images.idx"), tmp_path)
    assert msg.startswith("data.train.labels: images.idx holds") and "images and labels look swapped" in msg


def test_unscaled_8_bit_inputs_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = (write_idx(tmp_path / "i", synthetic_images()), write_idx(tmp_path / "l", synthetic_labels()))
    with caplog.at_level("WARNING", logger="influence_cli"):
        load_dataset(idx_spec(files), tmp_path)
    assert "data.train: 8-bit inputs reach the model as values 0..255 (data.train.transform.scale is not set)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        load_dataset(idx_spec(files, transform=TransformSpec(scale=255.0)), tmp_path)
    assert "8-bit" not in caplog.text


@pytest.mark.parametrize(
    ("scale", "mean", "std", "warning"),
    [
        (None, [0.485], [0.229], "data.train: data.train.transform.normalize has the mean [0.485] of inputs in [0, 1] (as torchvision's Normalize "
         "after ToTensor), but the 8-bit inputs reach it as 0..255 (data.train.transform.scale is not set): set data.train.transform.scale: 255.0"),
        (255.0, [123.675], [58.395], "data.train: data.train.transform.normalize has the mean [123.675], beyond the inputs' range after "
         "data.train.transform.scale: 255 (0..1): for statistics of 0..255 pixels leave data.train.transform.scale out, or divide them by 255 too"),
        (255.0, [0.485], [0.229], None),
        (None, [123.675], [58.395], None),
        (None, [300.0], [1.0], "data.train: data.train.transform.normalize has the mean [300], beyond the 8-bit inputs' range (0..255, "
         "data.train.transform.scale is not set): give the mean and std of the values normalize sees"),
    ],
    ids=["unit-stats-unscaled", "pixel-stats-scaled", "unit-stats-scaled", "pixel-stats-unscaled", "beyond-255-unscaled"],
)  # fmt: skip
def test_normalize_statistics_of_another_range_than_the_8_bit_inputs_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, scale: float | None, mean: list, std: list, warning: str | None
) -> None:
    """torchvision's Normalize follows ToTensor's division by 255; here transform.scale does it, so statistics of
    one range with inputs in the other (normalized values near ±1000, or near -2 for every pixel) are warned about."""
    files = (write_idx(tmp_path / "i", synthetic_images()), write_idx(tmp_path / "l", synthetic_labels()))
    with caplog.at_level("WARNING", logger="influence_cli"):
        load_dataset(idx_spec(files, transform=TransformSpec(scale=scale, normalize=NormalizeSpec(mean, std))), tmp_path)
    if warning is None:
        assert "normalize" not in caplog.text
    else:
        assert warning in caplog.text


@pytest.mark.parametrize(
    ("stored", "channels", "shape"),
    [((6, 5, 4), 1, (1, 5, 4)), ((6, 5, 4), 3, (3, 5, 4)), ((6, 1, 5, 4), 3, (3, 5, 4)), ((6, 3, 5, 4), 1, (1, 5, 4)), ((6, 3, 5, 4), 3, (3, 5, 4))],
)
def test_transform_channels_makes_grayscale_or_rgb_images(tmp_path: Path, stored: tuple, channels: int, shape: tuple) -> None:
    inputs = torch.rand(stored, generator=torch.Generator().manual_seed(0))
    save_file({"inputs": inputs, "labels": torch.arange(6) % 2}, tmp_path / "t.safetensors")
    ds = load_dataset(DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(channels=channels)), tmp_path)
    x, _, _ = ds[2]
    assert ds.input_shape == shape and x.shape == shape
    source = inputs[2] if len(stored) == 4 else inputs[2][None]
    if source.shape[0] == shape[0]:
        assert torch.equal(x, source)
    elif channels == 3:
        assert all(torch.equal(x[c], source[0]) for c in range(3))
    else:  # Pillow's luminance weights
        torch.testing.assert_close(x[0], 0.299 * source[0] + 0.587 * source[1] + 0.114 * source[2])
    unset = load_dataset(DataSpec(source="tensors", path="t.safetensors"), tmp_path)
    assert ds.fingerprint() != unset.fingerprint()


def test_transform_channels_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    save_file({"inputs": torch.rand(4, 5, 6, 3), "labels": torch.arange(4)}, tmp_path / "t.safetensors")
    spec = DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(channels=1))
    with pytest.raises(DataError, match=r"data.train.transform.channels: inputs of shape \[5, 6, 3\] are not grayscale or RGB images") as err:
        load_dataset(spec, tmp_path)
    assert "channels_first" in err.value.hint
    spec.transform.channels_first = True
    assert load_dataset(spec, tmp_path).input_shape == (1, 5, 6)


def test_token_ids_take_no_channels(tmp_path: Path) -> None:
    save_file({"inputs": torch.randint(0, 9, (4, 8, 8)), "labels": torch.arange(4)}, tmp_path / "t.safetensors")
    spec = DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(channels=3, dtype="int64"))
    with pytest.raises(DataError, match=r"int64 token ids cannot be combined with channels"):
        load_dataset(spec, tmp_path)


def test_inputs_of_one_number_each_are_not_called_a_shape_of_the_batch_size() -> None:
    from influence_cli.passes import inputs_named

    with pytest.raises(DataError, match=r"inputs of one number per example \(a batch of 8, shape \[8\]\) do not fit the model"):
        with inputs_named(torch.zeros(8), torch.arange(8), "data.train", first=True):
            torch.nn.Linear(3, 2)(torch.zeros(8))


def test_per_channel_normalize_on_images_without_a_channel_axis_says_so(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"inputs": torch.zeros(4, 6, 5), "labels": torch.zeros(4, dtype=torch.int64)}, tmp_path / "d.safetensors")
    spec = DataSpec(source="tensors", path="d.safetensors", transform=TransformSpec(normalize=NormalizeSpec(mean=[0.5] * 2, std=[0.2] * 2)))
    assert "[H, W] images have no channel axis: give a single mean and std" in error_of(spec, tmp_path)


def test_normalize_takes_one_mean_and_std_per_column_of_feature_rows(tmp_path: Path) -> None:
    """Tabular rows [F]: F values standardize each column on its own scale (one value serves them all)."""
    x = torch.tensor([[1.0, 2e6, -3.0], [3.0, 4e6, 5.0]])
    save_file({"inputs": x, "labels": torch.zeros(2)}, tmp_path / "t.safetensors")
    norm = NormalizeSpec(mean=[2.0, 3e6, 1.0], std=[1.0, 1e6, 4.0])
    ds = load_dataset(DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(normalize=norm)), tmp_path)
    torch.testing.assert_close(torch.stack([ds[i][0] for i in range(2)]), torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    two = NormalizeSpec(mean=[0.0, 0.0], std=[1.0, 1.0])
    spec = DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(normalize=two))
    assert error_of(spec, tmp_path) == "data.train.transform.normalize: 2 values given for inputs of shape [3] (3 columns)"


def test_normalize_keeps_float64_inputs_exact(tmp_path: Path) -> None:
    """A float64 column of timestamps near 1.7e9 with a std of 1414: a mean rounded to float32 (1700001024, not
    ...037) would shift the column by 0.009 std; float32 inputs are normalized as before."""
    x = torch.tensor([[1.0, 1_700_000_037.0], [3.0, 1_700_002_037.0]], dtype=torch.float64)
    save_file({"inputs": x, "labels": torch.zeros(2)}, tmp_path / "t.safetensors")
    mean, std = x.mean(0).tolist(), x.std(0).tolist()
    for norm in (NormalizeSpec(mean=mean, std=std), NormalizeSpec(mean=mean[1:], std=std[1:])):
        ds = load_dataset(DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(normalize=norm)), tmp_path)
        got = torch.stack([ds[i][0] for i in range(2)])
        assert got.dtype == torch.float64
        torch.testing.assert_close(got[:, 1], torch.tensor([-0.5, 0.5], dtype=torch.float64) * 2**0.5, rtol=0, atol=1e-12)
    save_file({"inputs": x.float(), "labels": torch.zeros(2)}, tmp_path / "t.safetensors")
    ds = load_dataset(DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(normalize=NormalizeSpec(mean=mean, std=std))), tmp_path)
    assert ds[0][0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_normalize_and_scale_keep_wide_integer_inputs_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    """Integer timestamps near 1.7e9, 7 s apart (std 9): float32 holds them to 128 s, so rounding them before
    normalize made the column all 0, up to 1.16 std off. They are scaled and normalized in float64, as float64
    inputs are, and handed on as float32 (transform.dtype's); 8- and 16-bit inputs (images) stay float32."""
    ts = 1_700_000_000 + 7 * torch.arange(4, dtype=torch.int64)
    x = torch.stack([torch.arange(4), ts], 1).to(dtype)
    save_file({"inputs": x, "labels": torch.zeros(4)}, tmp_path / "t.safetensors")
    exact = x.double()
    mean, std = exact.mean(0).tolist(), exact.std(0).tolist()
    expected = (exact - exact.mean(0)) / exact.std(0)
    for transform in (
        TransformSpec(normalize=NormalizeSpec(mean=mean, std=std)),
        TransformSpec(scale=1000.0, normalize=NormalizeSpec(mean=[m / 1000 for m in mean], std=[s / 1000 for s in std])),
    ):
        ds = load_dataset(DataSpec(source="tensors", path="t.safetensors", transform=transform), tmp_path)
        got = torch.stack([ds[i][0] for i in range(4)])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)  # values of about 1 in float32: 6e-8
    for small in (torch.uint8, torch.int16):
        save_file({"inputs": x[:, :1].to(small), "labels": torch.zeros(4)}, tmp_path / "t.safetensors")
        assert load_dataset(DataSpec(source="tensors", path="t.safetensors", transform=TransformSpec(scale=3.0)), tmp_path)[0][0].dtype == torch.float32


def test_a_file_named_npz_that_is_no_archive_is_named_as_such(tmp_path: Path) -> None:
    """numpy reads anything without a zip or .npy header as a pickle, and said "allow_pickle"."""
    (tmp_path / "d.npz").write_bytes(b"not an archive at all")
    msg = error_of(DataSpec(source="tensors", path="d.npz"), tmp_path)
    assert msg == "data.train.path: d.npz is not an .npz archive (no zip header)"


def test_an_npz_array_of_python_objects_is_named_by_its_key(tmp_path: Path) -> None:
    """Sequences of different lengths saved with numpy.savez become an object array, as does a pandas text column,
    which numpy reads only by unpickling: a readable archive, said so with the fix, not as a file that may be truncated."""
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.arange(3), np.arange(5)]
    np.savez(tmp_path / "seq.npz", inputs=ragged, labels=np.array([0, 1]))
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="tensors", path="seq.npz"), tmp_path)
    assert info.value.message == "data.train.path: the array 'inputs' in seq.npz holds Python objects (sequences of different lengths, or text), not numbers"
    assert info.value.hint is not None and "data.padding_value" in info.value.hint
    np.savez(tmp_path / "names.npz", inputs=np.zeros((2, 3)), labels=np.array(["cat", "dog"], dtype=object))  # a pandas column's values
    assert error_of(DataSpec(source="tensors", path="names.npz"), tmp_path).startswith("data.train.path: the array 'labels' in names.npz holds Python objects")


def test_a_factory_that_cannot_find_a_relative_file_says_where_it_looked(tmp_path: Path) -> None:
    mod = write_module(
        tmp_path,
        """
        def make(path):
            return open(path).read()
        """,
    )
    with pytest.raises(DataError, match=r"raised FileNotFoundError") as info:
        load_dataset(DataSpec(source=f"{mod}:make", kwargs={"path": "gtrain"}), tmp_path)
    assert "opens relative paths from the working directory" in info.value.hint and "data.train.kwargs" in info.value.hint


def test_mnist_in_torchvisions_old_processed_layout_still_loads(tmp_path: Path) -> None:
    """Read by torchvision's reader, MNIST's classes are named as when its IDX files are read ("3", which
    tables show as the number alone), not torchvision's "3 - three"."""
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    images, labels = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8), torch.arange(10) % 10
    for name in ("training.pt", "test.pt"):
        torch.save((images, labels), processed / name)
    ds = load_dataset(DataSpec(source="mnist", root=str(tmp_path), split="test"), ".")
    assert len(ds) == 10 and ds.labels.tolist() == labels.tolist()
    assert ds.class_names == [str(i) for i in range(10)]


def test_a_query_folder_takes_data_trains_colours_when_a_train_class_folder_is_empty(tmp_path: Path) -> None:
    from influence_cli.config import config_from_dict

    root = write_image_folder(tmp_path / "imgs")  # RGB
    (root / "zebra").mkdir()
    spec = {"source": "image_folder", "root": "imgs"}
    cfg = config_from_dict({"model": {"architecture": "mlp"}, "data": {"train": spec, "query": dict(spec)}}, base_dir=tmp_path)
    train, query = (load_dataset(s, tmp_path, name=n) for s, n in ((cfg.data.train, "data.train"), (cfg.data.query, "data.query")))
    assert train[0][0].shape == query[0][0].shape == (3, 6, 5)
