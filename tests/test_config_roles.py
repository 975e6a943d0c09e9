"""TrainConfig field roles: declared once per field, every set of fields derived from them."""

from __future__ import annotations

import dataclasses

import pytest

from pwsconv.config import FIELD_ROLES, RESUME_MUTABLE_FIELDS, TrainConfig, fields_with

# the literal sets the code held before the roles were declared on the fields (results/ were matched with them)
RESUME_MUTABLE_BEFORE = frozenset({"epochs", "max_steps", "ckpt_every", "log_every", "progress", "tensorboard",
                                   "out_dir", "name", "device", "data_root", "num_threads", "num_workers", "fuse_pws",
                                   "pws_recompute", "data_on_device", "compile"})   # the last two: issue 21
SWEEP_COSMETIC_BEFORE = frozenset({"progress", "out_dir", "name", "device", "data_root", "tensorboard", "log_every",
                                   "ckpt_every", "num_threads", "num_workers", "fuse_pws", "pws_recompute",
                                   "data_on_device", "compile"})
LENGTH_BEFORE = frozenset({"epochs", "max_steps"})


def test_every_field_declares_one_known_role():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("role") in FIELD_ROLES, f.name
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    parts = [fields_with(r) for r in FIELD_ROLES]
    assert set().union(*parts) == names and sum(map(len, parts)) == len(names)   # a partition


def test_derived_sets_equal_the_former_literal_sets():
    from pwsconv.experiments import sweep
    from pwsconv.train import engine

    assert RESUME_MUTABLE_FIELDS == RESUME_MUTABLE_BEFORE
    assert fields_with("length") == LENGTH_BEFORE
    assert fields_with("cosmetic") == SWEEP_COSMETIC_BEFORE
    assert sweep._COSMETIC == SWEEP_COSMETIC_BEFORE
    assert engine._COSMETIC_FIELDS == RESUME_MUTABLE_BEFORE - LENGTH_BEFORE
    assert isinstance(RESUME_MUTABLE_FIELDS, frozenset)


def test_fields_with_rejects_an_unknown_role():
    with pytest.raises(ValueError, match="unknown field role"):
        fields_with("speed")
    assert fields_with() == frozenset()


def test_prepare_options_come_from_field_metadata():
    """The engine passes the method's preparation options by the fields' declarations, not by their names."""
    from pwsconv.config import TrainConfig, prepare_options

    assert prepare_options(TrainConfig()) == {"fuse": True, "recompute": False}
    assert prepare_options(TrainConfig(fuse_pws=False, pws_recompute=True)) == {"fuse": False, "recompute": True}
