"""Reading scores: top-k against a full sort, ties, shards vs one file, block sizes, selections and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from influence_cli import storage
from influence_cli import topk as topk_mod
from influence_cli.errors import OutputError, UsageError
from influence_cli.topk import _best, iter_score_blocks, load_scores_meta, pair_parts, select_queries, self_top_k, top_k


def write_scores(
    out: Path, scores: torch.Tensor, shard_len: int | None = None, relative: bool = False,
    parts: torch.Tensor | None = None, norms: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """A scores run written by hand: one file, or shards of `shard_len` train columns plus the index; with
    `parts` [L, n_query, n_train] the per-layer parts of layers "l0", "l1", ... (compute-scores --by-layer),
    with `norms` [n_train] the RelatIF norms."""
    n_query, n_train = scores.shape
    common = {
        "query_indices": torch.arange(100, 100 + n_query),
        "query_labels": torch.arange(n_query) % 3,
        "query_predictions": (torch.arange(n_query) + 1) % 3,
    }
    meta = {storage.FORMAT_KEY: storage.SCORES_FORMAT, "relative": relative, "measurement": "loss"}
    if parts is not None:
        meta[storage.BY_LAYER] = [f"l{i}" for i in range(parts.shape[0])]

    def extra(c0: int, c1: int) -> dict[str, torch.Tensor]:
        return ({storage.SCORES_BY_LAYER: parts[:, :, c0:c1]} if parts is not None else {}) | ({"train_norms": norms[c0:c1]} if norms is not None else {})

    train_indices = torch.arange(n_train) * 2 + 1  # global indices differ from positions
    if shard_len is None:
        storage.save_tensors(
            out / storage.SCORES_FILE,
            common | {"scores": scores, "train_indices": train_indices, "train_labels": torch.arange(n_train) % 5} | extra(0, n_train),
            meta,
        )
        return
    shards = []
    for number, c0 in enumerate(range(0, n_train, shard_len)):
        c1 = min(n_train, c0 + shard_len)
        name = storage.SCORES_SHARD.format(shard=number)
        tensors = common | {
            "scores": scores[:, c0:c1],
            "train_indices": train_indices[c0:c1],
            "train_labels": torch.arange(c0, c1) % 5,
        } | extra(c0, c1)
        storage.save_tensors(out / name, tensors, meta)
        shards.append({"file": name, "shard": number, "train_start": c0, "train_stop": c1})
    storage.save_json(out / storage.SCORES_INDEX, {storage.FORMAT_KEY: storage.SCORES_FORMAT, "n_query": n_query, "n_train": n_train,
                                                   "shards": shards, "metadata": {k: v for k, v in meta.items() if k != storage.FORMAT_KEY}})


def brute_force(scores: torch.Tensor, k: int, largest: bool) -> tuple[list[list[int]], list[list[float]]]:
    """Full sort per row by (score, then position ascending)."""
    pos, vals = [], []
    for row in scores.float():
        order = sorted(range(len(row)), key=lambda j: (-row[j].item() if largest else row[j].item(), j))[:k]
        pos.append(order)
        vals.append([row[j].item() for j in order])
    return pos, vals


def test_best_breaks_ties_by_position_and_keeps_exactly_k():
    v = torch.tensor([[1.0, 3.0, 3.0, 3.0, 2.0, 3.0] + [0.0] * 20, [5.0] * 26])
    p = torch.arange(26).expand(2, 26)
    values, positions = _best(v, p, 3)
    assert positions.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert values.tolist() == [[3.0, 3.0, 3.0], [5.0, 5.0, 5.0]]
    # the small-block path (full sort) agrees
    values2, positions2 = _best(v[:, :6], p[:, :6], 3)
    assert positions2.tolist() == [[1, 2, 3], [0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard_len", [None, 7, 16], ids=["one-file", "shards-of-7", "shards-of-16"])
def test_top_k_equals_a_full_sort(tmp_path, dtype, shard_len):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-6, 7, (5, 40), generator=g).to(dtype) / 4  # many exact ties
    if dtype == torch.float32:
        scores = scores + torch.randn(5, 40, generator=g) * 1e-3
    write_scores(tmp_path, scores, shard_len)
    for max_elements in (5 * 3, 5 * 40):
        got = top_k(tmp_path, None, 6, max_elements=max_elements)
        top_pos, top_val = brute_force(scores, 6, True)
        low_pos, low_val = brute_force(scores, 6, False)
        for q, r in enumerate(got):
            assert [e.train_position for e in r.proponents] == top_pos[q]
            assert [e.score for e in r.proponents] == top_val[q]
            assert [e.train_position for e in r.opponents] == low_pos[q]
            assert [e.score for e in r.opponents] == low_val[q]
            assert [e.train_index for e in r.proponents] == [2 * j + 1 for j in top_pos[q]]
            assert [e.train_label for e in r.proponents] == [j % 5 for j in top_pos[q]]
            assert [e.rank for e in r.proponents] == list(range(1, 7))
            assert (r.query_index, r.query_label, r.query_prediction) == (100 + q, q % 3, (q + 1) % 3)


def test_sharded_and_single_file_rank_identically(tmp_path):
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    write_scores(tmp_path / "one", scores)
    write_scores(tmp_path / "many", scores, shard_len=8)
    assert top_k(tmp_path / "one", [1, slice(2, 4)], 5) == top_k(tmp_path / "many", [1, slice(2, 4)], 5, max_elements=12)
    assert load_scores_meta(tmp_path / "many").sharded and not load_scores_meta(tmp_path / "one").sharded


def test_blocks_follow_the_requested_query_order(tmp_path):
    scores = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
    write_scores(tmp_path, scores, shard_len=9)
    blocks = list(iter_score_blocks(tmp_path, [4, 1, 4, 0], max_elements=4 * 3))
    # 3 distinct rows read, 4 columns per block, blocks never cross a shard
    assert [(b.train_start, b.train_stop) for b in blocks] == [(0, 4), (4, 8), (8, 9), (9, 13), (13, 17), (17, 18), (18, 20)]
    assert torch.equal(torch.cat([b.scores for b in blocks], 1), scores[[4, 1, 4, 0]])


def test_only_proponents_or_opponents(tmp_path):
    scores = torch.tensor([[0.5, -1.0, 2.0, -0.25, 0.0, 1.0, -3.0, 0.75, 0.1, -0.2]])
    write_scores(tmp_path, scores)
    only_best = top_k(tmp_path, 0, 2, smallest=False)
    assert len(only_best) == 1 and len(only_best[0].proponents) == 2 and only_best[0].opponents == []
    everything = top_k(tmp_path, 0, 20)[0]  # k larger than n_train: every positive score, and every negative one
    assert [e.score for e in everything.proponents] == [2.0, 1.0, 0.75, 0.5, pytest.approx(0.1)]
    assert [e.score for e in everything.opponents] == [-3.0, -1.0, -0.25, pytest.approx(-0.2)]
    assert [e.rank for e in everything.opponents] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "selection,needle",
    [(7, "--query 7: outside the 7 queries (valid: 0..6)"), (slice(9, 12), "--query 9:12: outside the 7 queries (valid: 0..6"),
     ([-1], "--query -1: outside the 7 queries (valid: 0..6)"), (slice(-1, 3), "--query -1:3: expected START:STOP"),
     (slice(3, 3), "--query 3:3: an empty range")],  # fmt: skip
)
def test_query_selection_out_of_range_names_the_flag(selection, needle):
    with pytest.raises(UsageError) as info:
        select_queries(7, selection)
    assert needle in info.value.message


def test_a_dataset_index_given_as_a_position_is_pointed_out():
    with pytest.raises(UsageError) as info:
        select_queries(3, 1501, torch.tensor([1500, 1501, 1502]))
    assert "not dataset indices: index 1501 is at position 1" in info.value.hint


def test_a_position_beyond_int64_is_out_of_range_not_a_crash():
    """--query 99999999999999999999999 is compared with the int64 dataset indices only when it is one."""
    for position in (2**70, -(2**70), 2**63):
        with pytest.raises(UsageError, match=f"--query {position}: outside the 3 queries") as info:
            select_queries(3, position, torch.tensor([1500, 1501, 1502]))
        assert info.value.hint is None


def test_an_over_long_position_is_shortened_not_a_crash():
    """A position past Python's digits for text (4,300) is named by its head and length, not a ValueError of str()."""
    for selection, shown in ((10**5000, f"1{'0' * 75}... (5,001 characters): outside"), (-(10**4000), f"-1{'0' * 74}... (4,002 characters): outside"),
                             (10**5000 - 1, f"{'9' * 76}... (5,000 characters): outside"),  # log10 of 5,000 nines rounds up to 5,000
                             (-(10**4400 - 1), f"-{'9' * 76}... (4,401 characters): outside"),
                             (slice(10**5000, None), f"1{'0' * 35}... (5,001 characters):: an empty range")):  # fmt: skip
        with pytest.raises(UsageError) as info:
            select_queries(3, selection)
        assert info.value.message.startswith(f"--query {shown}"), info.value.message


def test_query_selection_forms(caplog):
    with caplog.at_level("WARNING", logger="influence_cli"):
        assert select_queries(5, None) == [0, 1, 2, 3, 4]
        assert select_queries(5, [3, slice(0, 2), 3, slice(4, None)]) == [3, 0, 1, 4]
        assert not caplog.records
        assert select_queries(20, slice(15, 99)) == [15, 16, 17, 18, 19]
    assert "--query 15:99: the scores hold 20 queries; ranking 15:20" in caplog.text  # clipped, and said


def test_missing_scores_say_how_to_make_them(tmp_path):
    with pytest.raises(OutputError, match="no scores in") as info:
        top_k(tmp_path, None, 3)
    assert "compute-scores" in info.value.hint
    with pytest.raises(OutputError, match="no self-influence") as info:
        self_top_k(tmp_path, 3)
    assert "--self" in info.value.hint and "--resume" not in info.value.hint


def test_missing_scores_of_an_interrupted_run_say_resume(tmp_path):
    """Progress files, or the shards a sharded run finished before it was killed (no index yet)."""
    write_scores(tmp_path, torch.randn(2, 10), shard_len=4)
    (tmp_path / storage.SCORES_INDEX).unlink()
    with pytest.raises(OutputError, match="no scores in") as info:
        top_k(tmp_path, None, 3)
    assert info.value.hint == "compute-scores was interrupted: rerun it with --resume to finish"
    (tmp_path / storage.SCORES_PARTIAL.format(rank=".self")).write_bytes(b"progress")
    with pytest.raises(OutputError, match="no self-influence") as info:
        self_top_k(tmp_path, 3)
    assert info.value.hint == "compute-scores --self was interrupted: rerun it with --resume to finish"


def test_missing_scores_that_a_running_compute_scores_is_writing_say_wait(tmp_path):
    """Not "interrupted: --resume" while the run holds the lock (its --resume would be refused as busy)."""
    (tmp_path / storage.SCORES_PARTIAL.format(rank="")).write_bytes(b"progress")
    for what, read, needle in (("scores", lambda: top_k(tmp_path, None, 3), "compute-scores is writing them now (pid "),
                               ("self_influence", lambda: self_top_k(tmp_path, 3), "compute-scores --self is writing them now (pid ")):  # fmt: skip
        with storage.output_dir_lock(tmp_path, what):
            with pytest.raises(OutputError) as info:
                read()
            assert info.value.hint.startswith(needle) and info.value.hint.endswith("wait for it to finish"), info.value.hint
        with pytest.raises(OutputError) as info:  # the run is gone: what it left says what to do
            read()
        assert "writing them now" not in info.value.hint
    assert storage.writer_of(tmp_path, "scores") is None and not (tmp_path / storage.LOCK_FILE.format(what="scores")).exists()


def test_missing_shard_is_reported(tmp_path):
    write_scores(tmp_path, torch.randn(2, 10), shard_len=4)
    (tmp_path / storage.SCORES_SHARD.format(shard=1)).unlink()
    with pytest.raises(OutputError, match="scores.shard-00001.safetensors"):
        top_k(tmp_path, None, 3)


def test_self_top_k_orders_by_self_influence(tmp_path):
    values = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0])
    storage.save_tensors(
        tmp_path / storage.SELF_INFLUENCE_FILE,
        {"self_influence": values, "train_indices": torch.arange(10, 15), "train_labels": torch.tensor([0, 1, 2, 3, 4])},
        {storage.FORMAT_KEY: storage.SELF_FORMAT},
    )
    got = self_top_k(tmp_path, 3)
    assert [(e.rank, e.train_index, e.train_label, e.score) for e in got] == [(1, 11, 1, 3.0), (2, 13, 3, 3.0), (3, 14, 4, 2.0)]
    assert [e.train_index for e in self_top_k(tmp_path, 2, largest=False)] == [12, 10]
    assert self_top_k(tmp_path / storage.SELF_INFLUENCE_FILE, 3) == got  # the file's path, from Python


def test_self_top_k_ranks_by_training_loss_when_asked(tmp_path):
    """rank_by="loss": the largest losses first (ties by position), each example with its self-influence and loss."""
    values, losses = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0]), torch.tensor([2.0, 0.25, 2.0, 7.0, 0.0])
    tensors = {"self_influence": values, "train_indices": torch.arange(10, 15), storage.SELF_LOSSES: losses}
    storage.save_tensors(tmp_path / storage.SELF_INFLUENCE_FILE, tensors, {storage.FORMAT_KEY: storage.SELF_FORMAT})
    got = self_top_k(tmp_path, 3, rank_by="loss")
    assert [(e.rank, e.train_index, e.score, e.loss) for e in got] == [(1, 13, 3.0, 7.0), (2, 10, 0.5, 2.0), (3, 12, -1.0, 2.0)]
    assert [e.train_index for e in self_top_k(tmp_path, 2, largest=False, rank_by="loss")] == [14, 11]
    assert [(e.train_index, e.loss) for e in self_top_k(tmp_path, 2)] == [(11, 0.25), (13, 7.0)]  # by self-influence, with the loss
    with pytest.raises(UsageError, match=r"--rank-by: 'losses' is not one of self-influence, loss"):
        self_top_k(tmp_path, 3, rank_by="losses")


def test_ranking_by_loss_a_file_without_losses_says_to_rerun_compute_scores(tmp_path):
    """Self-influence written before the losses were stored: ranked by self-influence as before; by loss, refused with the fix."""
    tensors = {"self_influence": torch.tensor([0.5, 3.0]), "train_indices": torch.arange(2)}
    storage.save_tensors(tmp_path / storage.SELF_INFLUENCE_FILE, tensors, {storage.FORMAT_KEY: storage.SELF_FORMAT})
    assert [(e.train_index, e.loss) for e in self_top_k(tmp_path, 2)] == [(1, None), (0, None)]
    with pytest.raises(OutputError, match=r"--rank-by loss: '.*self_influence.safetensors' holds no train_losses") as info:
        self_top_k(tmp_path, 2, rank_by="loss")
    assert info.value.hint == "rerun `influence compute-scores CONFIG --self --overwrite` to store them"
    assert "--rank-by is self_top_k's or top_examples' rank_by=" in str(info.value)  # the flag, from Python


@pytest.mark.parametrize("shard_len", [None, 16], ids=["one-file", "shards"])
def test_top_k_takes_the_scores_file_or_index_for_its_folder(tmp_path, shard_len):
    write_scores(tmp_path, torch.randn(3, 40, generator=torch.Generator().manual_seed(1)), shard_len)
    name = storage.SCORES_FILE if shard_len is None else storage.SCORES_INDEX
    assert top_k(tmp_path / name, None, 4) == top_k(tmp_path, None, 4)


@pytest.mark.parametrize("k", [1, 3])  # k = 1 takes the block pre-selection (columns > 4k)
def test_scores_holding_nan_are_refused_not_ranked(tmp_path, k):
    """compute-scores never writes NaN; a file that holds some would empty a query's lists (or crash)."""
    scores = torch.tensor([[0.5, float("nan"), 2.0, -1.0, 0.0, 1.0, 0.25, -0.5]])
    write_scores(tmp_path, scores)
    with pytest.raises(OutputError, match="holds NaN scores, which compute-scores never writes") as exc:
        top_k(tmp_path, None, k)
    assert "compute-scores" in exc.value.hint
    storage.save_tensors(tmp_path / storage.SELF_INFLUENCE_FILE, {"self_influence": torch.tensor([0.5, float("nan")]), "train_indices": torch.arange(2)},
                         {storage.FORMAT_KEY: storage.SELF_FORMAT})  # fmt: skip
    with pytest.raises(OutputError, match="self_influence.safetensors' holds NaN scores"):
        self_top_k(tmp_path, k)


def test_cli_says_when_a_query_has_no_opponent(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from influence_cli.cli import app

    out = tmp_path / "out"
    out.mkdir()
    write_scores(out, torch.tensor([[0.5, 2.0, 1.0], [-1.0, 0.5, -2.0]]))
    sample = Path(__file__).resolve().parents[1] / "sample_data" / "digits.safetensors"
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 64, "hidden": [8], "num_classes": 10}},
        "data": {"train": {"source": "tensors", "path": str(sample)}},
        "output_dir": str(out),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner(env={"COLUMNS": "120"}).invoke(app, ["top-k", str(tmp_path / "c.yaml"), "--k", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("no negative score") == 1 and "no positive score" not in result.stdout


def test_top_k_names_image_folder_examples_by_file_and_class(tmp_path):
    """Image folders: each ranked example's file (relative to its root) in the table and the JSON, labels with class names."""
    import json

    import yaml
    from safetensors.torch import save_file
    from test_data import write_image_folder
    from typer.testing import CliRunner

    from influence_cli.cli import app
    from influence_cli.models import mlp

    write_image_folder(tmp_path / "imgs")  # cat/0..2.png, dog/0..1.png, 3 x 6 x 5
    torch.manual_seed(0)
    save_file(mlp(input_dim=90, hidden=[4], num_classes=2).state_dict(), tmp_path / "m.safetensors")
    folder = {"source": "image_folder", "root": "imgs", "transform": {"flatten": True, "scale": 255.0}}
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 90, "hidden": [4], "num_classes": 2}, "checkpoint": "m.safetensors"},
        "data": {"train": folder, "query": {**folder, "indices": [4]}, "batch_size": 2},
        "output_dir": "out",
        "device": "cpu",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for command in (["fit-factors"], ["compute-scores"], ["compute-scores", "--self"]):
        assert runner.invoke(app, [command[0], str(tmp_path / "c.yaml"), *command[1:]]).exit_code == 0
    data = json.loads(runner.invoke(app, ["top-k", str(tmp_path / "c.yaml"), "--k", "5", "--json"]).stdout)
    (query,) = data["queries"]
    assert query["query_file"] == "dog/1.png"
    ranked = {e["train_index"]: e["train_file"] for side in ("proponents", "opponents") for e in query[side]}
    assert ranked and all(ranked[i] == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"][i] for i in ranked)
    table = runner.invoke(app, ["top-k", str(tmp_path / "c.yaml"), "--k", "2"]).stdout
    assert "file dog/1.png" in table and "label 1 (dog)" in table and "│ file" in table.replace("┃", "│")
    rows = json.loads(runner.invoke(app, ["top-k", str(tmp_path / "c.yaml"), "--self", "--k", "5", "--json"]).stdout)["self_influence"]
    assert sorted(r["train_file"] for r in rows) == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"]
    assert "(cat)" in runner.invoke(app, ["top-k", str(tmp_path / "c.yaml"), "--self", "--k", "5"]).stdout
    import influence_cli.image_grid as image_grid

    drawn = []
    draw_tile = image_grid._draw_tile
    with pytest.MonkeyPatch.context() as mp:  # the picture's tiles name each example's file too
        mp.setattr(image_grid, "_draw_tile", lambda canvas, draw, font, tile, *rest: drawn.append(tile.lines) or draw_tile(canvas, draw, font, tile, *rest))
        for extra in ([], ["--self"]):
            assert runner.invoke(app, ["top-k", str(tmp_path / "c.yaml"), *extra, "--k", "5", "--image-grid", str(tmp_path / "g.png")]).exit_code == 0
    assert drawn[0][:2] == ["query #4", "1.png"] and all(lines[1] in ("0.png", "1.png", "2.png") for lines in drawn[1:])


@pytest.mark.parametrize("shard_len", [None, 2], ids=["one file", "shards"])
def test_scores_of_another_format_say_whether_another_version_wrote_them(tmp_path, shard_len):
    """Scores whose format names another version are to be written again; a file of another kind is not scores."""
    write_scores(tmp_path, torch.randn(3, 4), shard_len)
    path = tmp_path / (storage.SCORES_FILE if shard_len is None else storage.SCORES_INDEX)
    for found, message in (
        ("influence_cli.scores/0", "holds format influence_cli.scores/0, written by another version of influence_cli (this one reads influence_cli.scores/1)"),
        ("influence_cli.factors/1", "is not an output of format influence_cli.scores/1 (its format: 'influence_cli.factors/1')"),
    ):
        if shard_len is None:
            tensors, meta = storage.load_tensors(path)
            storage.save_tensors(path, tensors, {**meta, storage.FORMAT_KEY: found})
        else:
            storage.save_json(path, {**json.loads(path.read_text()), storage.FORMAT_KEY: found})
        with pytest.raises(OutputError) as exc:
            load_scores_meta(tmp_path)
        assert exc.value.message == f"{str(path)!r} {message}" and exc.value.hint == "rerun compute-scores with --overwrite"


def test_a_scores_index_of_another_version_is_named_so_whatever_its_fields(tmp_path):
    """Another version's index may describe its shards otherwise: its format is checked before they are."""
    write_scores(tmp_path, torch.randn(3, 200), 100)
    path = tmp_path / storage.SCORES_INDEX
    data = json.loads(path.read_text())
    data.update({storage.FORMAT_KEY: "influence_cli.scores/2", "n_train": 300})
    del data["n_query"]
    path.write_text(json.dumps(data))
    with pytest.raises(OutputError, match="written by another version of influence_cli"):
        load_scores_meta(tmp_path)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(shards=[]), "200 training examples in 0 shards"),
        (lambda d: d.update(n_query=10**30), "it lists 1000000000000000000000000000000 queries"),
        (lambda d: d["shards"][0].update(train_stop=10**30), "holds training positions 100..200, not from 1000000000000000000000000000000 on"),
        (lambda d: d["shards"].reverse(), "holds training positions 100..200, not from 0 on"),
        (lambda d: d.update(n_train=300), "the shards hold 200 training positions, not 300"),
        (lambda d: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["no shards", "queries", "huge stop", "out of order", "train count", "nested"],
)
def test_a_scores_index_that_does_not_describe_its_shards_is_refused(tmp_path, change, why):
    """An index whose numbers do not match its shards (edited or damaged) is refused by name, not left to fail (an
    overflow, a traceback, a loop over 10**30 positions) when top-k reads it."""
    write_scores(tmp_path, torch.randn(3, 200), 100)
    path = tmp_path / storage.SCORES_INDEX
    data = json.loads(path.read_text())
    changed = change(data)
    path.write_text(changed if isinstance(changed, str) else json.dumps(data))
    with pytest.raises(OutputError) as exc:
        load_scores_meta(tmp_path)
    assert exc.value.message.startswith(f"{str(path)!r} is not a readable scores index (") and why in exc.value.message
    assert exc.value.hint == "rerun compute-scores with --overwrite"


def test_an_output_of_another_kind_or_version_is_named_as_such(tmp_path):
    path = tmp_path / "f.safetensors"
    storage.save_tensors(path, {"x": torch.zeros(1)}, {storage.FORMAT_KEY: "influence_cli.factors/0"})
    with pytest.raises(OutputError, match=r"holds format influence_cli.factors/0, written by another version") as exc:
        storage.load_tensors(path, storage.FACTORS_FORMAT)
    assert exc.value.hint == "run the command that wrote it again, with --overwrite"
    storage.save_tensors(path, {"x": torch.zeros(1)}, {})
    with pytest.raises(OutputError, match=r"is not an output of format influence_cli.factors/1 \(its format: None\)") as exc:
        storage.load_tensors(path, storage.FACTORS_FORMAT)
    assert exc.value.hint == "point the command at the output_dir of a matching run"


def test_a_format_that_is_not_one_line_is_quoted(tmp_path):
    """A format that is not printable (a newline in another program's metadata) is quoted: the error stays one line."""
    error = storage.format_mismatch(tmp_path / "f.safetensors", "influence_cli.factors/0\nX", storage.FACTORS_FORMAT)
    assert "\n" not in error.message and error.message.endswith("(its format: 'influence_cli.factors/0\\nX')")


def full_sort(scores: torch.Tensor, k: int, largest: bool) -> list[list[int]]:
    """Positions of each row's k best by (score, then position ascending), by Python's sort (-0.0 equals 0.0)."""
    return [sorted(range(len(row)), key=lambda j: (-row[j] if largest else row[j], j))[:k] for row in scores.tolist()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_merge_equals_a_full_sort(dtype):
    """The running top-k of `top_k` (a topk of k + 1 per block, merged with the k kept so far) keeps exactly the
    full sort's k best per row, ties by position, whatever the block widths: many exact ties (more than places,
    at the k-th and across blocks), signed zeros, infinities, labels of several values and shards without labels."""
    from influence_cli.topk import ScoreBlock, _Running

    g = torch.Generator().manual_seed(3)
    rows, n = 7, 53
    scores = (torch.randint(-3, 4, (rows, n), generator=g) / 2).to(dtype)
    scores[0] = 1.0  # one value only: ties everywhere
    scores[1, ::3] = -0.0
    scores[2, 5], scores[2, 40], scores[3, 7] = float("inf"), float("-inf"), float("inf")
    scores[4] = torch.randn(n, generator=g, dtype=dtype)  # no ties
    indices, labels = torch.arange(n) * 3 + 2, torch.stack([torch.arange(n) % 4, torch.arange(n) // 4], 1)
    for k in (1, 2, 5, 13, n, n + 4):
        want = {largest: full_sort(scores, k, largest) for largest in (True, False)}
        for widths in ([n], [1] * n, [2, 3] * 10 + [3], [k] * (n // k) + [n % k] if k < n else [n], [7, 40, 6], [26, 27]):
            for sign in (1.0, -1.0):
                running, start, labelled = _Running(rows, k, sign), 0, []
                for w in (w for w in widths if w):
                    stop = start + w
                    unlabelled = 20 <= start < 30  # as from a shard without labels
                    running.update(ScoreBlock(start, stop, scores[:, start:stop], indices[start:stop], None if unlabelled else labels[start:stop]))
                    labelled += [not unlabelled] * w
                    start = stop
                assert start == n
                got = running.positions.tolist()
                assert got == want[sign == 1.0], (k, widths, sign)
                assert torch.equal(running.values * sign, torch.stack([scores[r, p] for r, p in enumerate(got)]))
                assert running.indices.tolist() == [[j * 3 + 2 for j in p] for p in got]
                for r, p in enumerate(got):
                    for i, j in enumerate(p):
                        assert bool(running.labelled[r, i]) is labelled[j]
                        if running.labelled[r, i]:
                            assert running.labels[r, i].tolist() == [j % 4, j // 4]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_top_k_of_many_queries_equals_a_full_sort(tmp_path, dtype):
    """top_k over files of another dtype (read as float32), query subsets in any order, shards and block sizes."""
    g = torch.Generator().manual_seed(4)
    scores = (torch.randint(-8, 9, (12, 90), generator=g) / 8).to(dtype)
    scores[::2] += (torch.randn(6, 90, generator=g) * 1e-3).to(dtype)
    (tmp_path / "one").mkdir()
    (tmp_path / "shards").mkdir()
    write_scores(tmp_path / "one", scores)
    write_scores(tmp_path / "shards", scores, shard_len=23)
    as_read = scores.float()
    selection = [9, slice(0, 3), 11, 5]
    rows = [9, 0, 1, 2, 11, 5]
    for k in (1, 4, 30):
        top, low = full_sort(as_read[rows], k, True), full_sort(as_read[rows], k, False)
        for folder in ("one", "shards"):
            for max_elements in (6, 6 * 5, 6 * 31, 6 * 90):
                got = top_k(tmp_path / folder, selection, k, max_elements=max_elements)
                assert [r.query_position for r in got] == rows
                for i, r in enumerate(got):
                    q = rows[i]
                    want_top = [j for j in top[i] if as_read[q, j] > 0]
                    want_low = [j for j in low[i] if as_read[q, j] < 0]
                    assert [e.train_position for e in r.proponents] == want_top
                    assert [e.train_position for e in r.opponents] == want_low
                    assert [e.score for e in r.proponents + r.opponents] == [as_read[q, j].item() for j in want_top + want_low]
                    assert [(e.train_index, e.train_label) for e in r.proponents + r.opponents] == [(2 * j + 1, j % 5) for j in want_top + want_low]


def stored_parts(parts: torch.Tensor, q: int, t: int, norms: torch.Tensor | None = None) -> dict[str, float]:
    """A pair's parts as the file holds them, read as float32 (times the example's float32 norm for --plain)."""
    values = parts[:, q, t].float()
    return dict(zip([f"l{i}" for i in range(parts.shape[0])], (values if norms is None else values * norms[t].float()).tolist(), strict=True))


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "relative"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_ranked_pair_carries_its_parts_as_stored(tmp_path, dtype, relative):
    """The parts of every ranked pair, bit for bit as the file holds them, whatever the files (one, shards),
    the queries chosen and their order, k, either side alone, and --plain of a relative run."""
    g = torch.Generator().manual_seed(5)
    scores = (torch.randint(-8, 9, (12, 90), generator=g) / 8).to(dtype)  # many ties
    parts = (torch.randn(3, 12, 90, generator=g) * 3).to(dtype)
    norms = torch.rand(90, generator=g) + 0.5 if relative else None
    for folder, shard_len in (("one", None), ("shards", 23)):
        (tmp_path / folder).mkdir()
        write_scores(tmp_path / folder, scores, shard_len, relative=relative, parts=parts, norms=norms)
    for folder in ("one", "shards"):
        for selection in (None, [9, slice(0, 3), 11, 5]):
            for k, largest, smallest in ((1, True, True), (4, True, False), (30, False, True), (30, True, True)):
                for plain in (False, True) if relative else (False,):
                    got = top_k(tmp_path / folder, selection, k, largest=largest, smallest=smallest, plain=plain, max_elements=6 * 31)
                    pairs = [(r.query_position, e) for r in got for e in r.proponents + r.opponents]
                    assert len(pairs) > len(got)
                    for q, e in pairs:
                        assert e.by_layer == stored_parts(parts, q, e.train_position, norms if plain else None)


def test_pair_parts_reads_any_pairs_in_blocks(tmp_path, monkeypatch):
    """Pairs in any order, repeated, across shards, read a few per read; a train position in no file gets {}."""
    g = torch.Generator().manual_seed(6)
    parts = torch.randn(2, 5, 30, generator=g)
    write_scores(tmp_path, parts.sum(0), shard_len=7, parts=parts)
    meta = load_scores_meta(tmp_path)
    pairs = [(4, 29), (0, 0), (4, 29), (2, 13), (1, 6), (3, 7), (0, 30), (2, 8), (0, -1), (1, 14)]
    want = [stored_parts(parts, q, t) if 0 <= t < 30 else {} for q, t in pairs]
    assert pair_parts(meta, pairs) == want
    monkeypatch.setattr(topk_mod, "_BLOCK_ELEMENTS", 2 * 2)  # two pairs per read
    assert pair_parts(meta, pairs) == want
    assert pair_parts(meta, []) == []
    with pytest.raises(UsageError, match=r"query position 5 is outside the 5 queries \(valid: 0..4\)"):
        pair_parts(meta, [(0, 1), (5, 1)])


def test_parts_of_another_shape_are_refused(tmp_path):
    parts = torch.randn(2, 4, 10)
    write_scores(tmp_path, parts.sum(0), parts=parts)
    tensors, meta = storage.load_tensors(tmp_path / storage.SCORES_FILE)
    storage.save_tensors(tmp_path / storage.SCORES_FILE, tensors | {storage.SCORES_BY_LAYER: parts[:, :3]}, meta)
    with pytest.raises(OutputError, match=r"holds scores_by_layer of shape \[2, 3, 10\], not \[2 layers .*, 4 queries, 10 train examples\]"):
        top_k(tmp_path, None, 2)
