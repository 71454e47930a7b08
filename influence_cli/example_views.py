"""How ranked examples are shown: their input token ids (language models and other models over
token ids), files (image folders), class names (sources that have them: image folders,
torchvision's sets, a factory's Dataset with `classes`), the label planted label noise replaced,
and their images.

`top-k` and `spectrum` rank examples by position or global index; this module turns those into
what a table, a JSON row or a picture shows, reading the datasets the scores were checked against
(`topk.check_scores_match`) or loading the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from influence_cli.data import IndexedDataset, example_image, load_dataset
from influence_cli.errors import ConfigError


@dataclass
class ExampleView:
    """One data spec's examples as tables and pictures show them, by position in the dataset.

    Attributes:
        dataset: The examples.
        token_data: A language model's examples, shown by their input ids (their labels are the
            same ids shifted by one); other models' token ids show beside their labels (`token_inputs`).
        padding_value: data.padding_value, left out of the ids shown.
    """

    dataset: IndexedDataset
    token_data: bool
    padding_value: float | None

    @property
    def class_names(self) -> list[str] | None:
        return self.dataset.class_names

    @property
    def has_files(self) -> bool:
        return self.dataset.has_files

    @property
    def has_label_noise(self) -> bool:
        return bool(self.dataset.noisy_mask.any())

    @property
    def token_inputs(self) -> bool:
        """Whether the inputs are integer token ids, shown as such: a language model's, or those of
        another model with an embedding table (`data.IndexedDataset.token_inputs`); never float
        features or images."""
        return self.token_data or self.dataset.token_inputs

    def input_ids(self, position: int) -> list[int]:
        """The example's input token ids without its padding (a language model's labels are the same ids shifted by one)."""
        x = self.dataset[position][0].reshape(-1)
        return [int(v) for v in (x if self.padding_value is None else x[x != self.padding_value]).tolist()]

    def file(self, position: int) -> str:
        """The example's file relative to its folder's root ("-" for sources without files)."""
        return self.dataset.example_file(position) or "-"

    def extras(self, position: int) -> dict[str, Any]:
        """What a JSON row adds to an example's label: `input` (token ids) and `file` (image folders)."""
        return ({"input": self.input_ids(position)} if self.token_inputs else {}) | ({"file": self.file(position)} if self.has_files else {})

    def clean_label(self, position: int) -> Any:
        """The label before label noise replaced it (int, or list), None where it was not replaced."""
        return self.dataset.clean_labels[position].tolist() if bool(self.dataset.noisy_mask[position]) else None

    def image(self, position: int) -> torch.Tensor:
        """float32 [C, H, W] in [0, 1] (`data.example_image`)."""
        return example_image(self.dataset, position)


@dataclass
class LabelNoiseCount:
    """Planted label noise among ranked examples."""

    in_ranking: int  # ranked examples whose label was replaced
    replaced: int  # labels replaced in the whole dataset
    size: int  # examples in the dataset


def count_label_noise(view: ExampleView, positions: list[int]) -> LabelNoiseCount:
    """How many of the examples at `positions` carry a label that label noise replaced."""
    mask = view.dataset.noisy_mask
    return LabelNoiseCount(int(mask[positions].sum()) if positions else 0, int(mask.sum()), len(mask))


def spec_views(cfg: Any, specs: dict[str, tuple[Any, str]], loaded: dict[str, IndexedDataset] | None = None) -> dict[str, ExampleView]:
    """Views of the data specs `specs` ({name: (data spec, its config key)}), by name: the datasets
    in `loaded` (by config key), the others loaded here as the model receives them, so that the
    integer inputs of a model with an embedding table are its token ids (`models.takes_token_ids`;
    the model is loaded once, and only when a spec is loaded here).

    Every command that shows examples builds its views here, so which inputs show as token ids
    (`ExampleView.token_inputs`) is decided alike for all.
    """
    from influence_cli.models import load_model, takes_token_ids

    views: dict[str, ExampleView] = {}
    token_ids: bool | None = None
    for name, (spec, key) in specs.items():
        if loaded is not None and key in loaded:
            dataset = loaded[key]
        else:
            if token_ids is None:  # integer inputs of a model with an embedding table are token ids, not images
                token_ids = takes_token_ids(load_model(cfg.model, cfg.base_dir))
            dataset = load_dataset(spec, cfg.base_dir, name=key, seed=cfg.seed, embedding_model=token_ids)
        views[name] = ExampleView(dataset, cfg.task.kind == "language_modeling", cfg.data.padding_value)
    return views


def example_views(cfg: Any, loaded: dict[str, IndexedDataset], which: list[str], *, required: bool = True) -> list[ExampleView | None]:
    """Views of the data specs named in `which` ("data.train", "data.query"): the datasets in
    `loaded` (those `topk.check_scores_match` matched to the scores), the others loaded here (`spec_views`).

    Raises:
        ConfigError: a spec in `which` is missing from the config (with `required`; else its view is None).
    """
    specs = {}
    for key in which:
        spec = cfg.data.train if key == "data.train" else cfg.data.query
        if spec is None:
            if required:
                raise ConfigError(f"{key}: missing in the config (top-k reads its examples)", source=cfg.source)
            continue
        specs[key] = (spec, key)
    views = spec_views(cfg, specs, loaded)
    return [views.get(key) for key in which]


__all__ = ["ExampleView", "LabelNoiseCount", "count_label_noise", "example_views", "spec_views"]
