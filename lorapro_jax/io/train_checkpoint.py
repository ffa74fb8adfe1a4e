"""Exactly resumable training checkpoints: :class:`TrainCheckpointer` on ``orbax.checkpoint.CheckpointManager``.

Saves everything a training run needs to continue bit for bit: the trainable variables (the
optimizer's ``wrt`` filter: adapters and e.g. a classifier head), the LoRA gates/masks/statistics,
the model's RNG streams (dropout), the whole ``nnx.Optimizer`` state (step count and ``opt_state``,
e.g. LoRA-Pro's full-size Adam moments ``(*in, *out)`` per pair), an optional extra ``nnx.Rngs``,
and a JSON ``data_state`` (e.g. ``{"epoch": 1, "index": 17}``). The storage format (plain nested
dicts of arrays) and the checks on restore are those of :mod:`lorapro_jax.io.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import orbax.checkpoint as ocp
from flax import nnx

from ..errors import CorruptFileError, check_path
from ..lora.nnx_lora import LoRAGate, LoRAMask, LoRAParam, LoRAStat
from .checkpoint import (FORMAT_VERSION, _abspath, _check_layers, _check_specs, _check_targets, _flat_fingerprints, _has_leaves, _layer_metadata, _leaf_specs, _template, _to_plain, _warn_unfinished, _write_back)
from .checkpoint_checks import load_json_item, restore_item, validate_meta, verify_arrays
from .integrity import fingerprints

__all__ = ["RestoredTrainState", "TrainCheckpointer"]

_TRAIN_EXPECTED = "a lorapro_jax training checkpoint written by TrainCheckpointer.save"
_log = logging.getLogger("lorapro_jax.checkpoint")  # the documented logger name


class RestoredTrainState(NamedTuple):
    """What :meth:`TrainCheckpointer.restore` returns besides the in-place restored objects.

    Attributes:
      step: the checkpoint's step number.
      data_state: the JSON ``data_state`` given to :meth:`TrainCheckpointer.save` (e.g. epoch, index).
      extra: the JSON ``extra`` given to :meth:`TrainCheckpointer.save`.
    """

    step: int
    data_state: Any
    extra: Any


class TrainCheckpointer:
    """Exactly resumable LoRA training checkpoints on top of ``orbax.checkpoint.CheckpointManager``.

    Each step directory holds the groups ``model`` (the model variables selected by
    :meth:`model_filter`), ``optimizer`` (``nnx.state(optimizer)``: step and ``opt_state``),
    optionally ``rngs`` (an extra ``nnx.Rngs``, e.g. for data shuffling) and ``meta`` (JSON: step,
    ``data_state``, ``extra``, LoRA layer metadata and the stored leaf shapes).

    What is saved from the model: the optimizer's ``wrt`` variables (or ``LoRAParam`` without an
    optimizer), all LoRA gates/masks/statistics, the model's RNG streams (``nnx.RngState``) and batch
    statistics (``nnx.BatchStat``), plus ``also_save``. The frozen base weights are NOT saved by
    default: rebuild the model from the pretrained weights before :meth:`restore`. If the base weights
    change during training (LoRA-Pro's optional ``W0`` decay, :func:`~lorapro_jax.decay_base_weights`),
    pass ``also_save=nnx.Param`` to save them too.

    Example::

      ckpt = TrainCheckpointer("/tmp/run", max_to_keep=2, save_interval_steps=100)
      for step in range(start, n_steps):
          ...train...
          ckpt.save(step + 1, model, opt, data_state={"epoch": epoch, "index": i})
      ckpt.wait_until_finished()
      # later, in a fresh process:
      model, opt = build()              # same architecture/config; fresh (or nnx.eval_shape) values
      info = ckpt.restore(model, opt)   # latest step; info.data_state == {"epoch": .., "index": ..}

    Args:
      directory: root directory of the step checkpoints (created).
      max_to_keep: keep only the newest ``max_to_keep`` checkpoints (``None``: keep all).
      save_interval_steps: :meth:`save` writes at the first call of this checkpointer and then only at
        steps that are multiples of this (orbax's policy; ``force=True`` overrides).
      async_save: write in a background thread (call :meth:`wait_until_finished` before reading).
      also_save: an NNX filter of further model variables to save (e.g. ``nnx.Param`` for all
        weights, ``"classifier"`` paths via ``nnx.PathContains``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        also_save: Any = None,
    ):
        check_path(directory, "directory", "TrainCheckpointer", "TrainCheckpointer(directory, ...)")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        self.directory = _abspath(directory)
        self.also_save = also_save
        _warn_unfinished(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # interrupted saves: orbax's temporary step folders
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -- filters ------------------------------------------------------------------------------------
    def model_filter(self, optimizer: nnx.Optimizer | None = None) -> Any:
        """The NNX filter of model variables that are saved (see the class docstring)."""
        wrt = getattr(optimizer, "wrt", None) if optimizer is not None else LoRAParam
        filters = [wrt, LoRAParam, LoRAGate, LoRAMask, LoRAStat, nnx.RngState, nnx.BatchStat]
        if self.also_save is not None:
            filters.append(self.also_save)
        return nnx.Any(*filters)

    def _groups(self, model, optimizer, rngs) -> dict[str, tuple[Any, nnx.State]]:
        groups = {"model": (model, nnx.state(model, self.model_filter(optimizer)))}
        if optimizer is not None:
            groups["optimizer"] = (optimizer, nnx.state(optimizer))
        if rngs is not None:
            groups["rngs"] = (rngs, nnx.state(rngs))
        return {k: v for k, v in groups.items() if _has_leaves(v[1])}

    # -- save / restore -------------------------------------------------------------------------------
    def save(
        self,
        step: int | None,
        model: nnx.Module,
        optimizer: nnx.Optimizer | None = None,
        *,
        data_state: Any = None,
        rngs: nnx.Rngs | None = None,
        extra: Any = None,
        force: bool = False,
    ) -> bool:
        """Saves the training state at ``step`` (if due under ``save_interval_steps``, or ``force``).

        Args:
          step: the step number (``None``: ``int(optimizer.step)``).
          model: the (LoRA-adapted) model.
          optimizer: its ``nnx.Optimizer`` (state, step count and ``wrt`` filter are used).
          data_state: JSON-serialisable data-iterator position, e.g. ``{"epoch": 1, "index": 17}``.
          rngs: an extra ``nnx.Rngs`` whose state is saved (e.g. the one that shuffles the data).
          extra: any JSON-serialisable value stored alongside.
          force: save even if the step is not due.

        Returns:
          Whether a checkpoint was started (with ``async_save`` it may still be writing).
        """
        _check_targets("TrainCheckpointer.save", "save(step, model, optimizer, ...)", model, optimizer, rngs)
        if step is None:
            if optimizer is None:
                raise ValueError("TrainCheckpointer.save: step=None needs an optimizer to read the step from.")
            step = int(optimizer.step[...])
        step = int(step)
        if not force and not self.manager.should_save(step):
            return False
        groups = self._groups(model, optimizer, rngs)
        plains = {name: _to_plain(state) for name, (_, state) in groups.items()}
        meta = {
            "format": "lorapro_jax.train",
            "version": FORMAT_VERSION,
            "step": step,
            "data_state": data_state,
            "extra": extra,
            "layers": _layer_metadata(model),
            "groups": {name: _leaf_specs(state) for name, (_, state) in groups.items()},
            "fingerprints": {name: _flat_fingerprints(plain) for name, plain in plains.items()},
        }
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"TrainCheckpointer.save: data_state / extra must be JSON-serialisable ({e}).") from e
        items = {name: ocp.args.StandardSave(plain) for name, plain in plains.items()}
        return bool(self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), force=force))

    def restore(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer | None = None,
        *,
        step: int | None = None,
        rngs: nnx.Rngs | None = None,
        skip_corrupt: bool = False,
    ) -> RestoredTrainState:
        """Restores a checkpoint in place into ``model`` / ``optimizer`` / ``rngs`` (concrete or abstract).

        The targets are the restore template: their structure, shapes, dtypes and shardings are kept.
        The groups saved must match the targets given (an optimizer state was saved iff an optimizer is
        given, etc.).

        Args:
          model: the model to restore into (same architecture and LoRA config as when saving).
          optimizer: the optimizer to restore into (same ``tx`` and ``wrt``).
          step: which step (default: the latest).
          rngs: the extra ``nnx.Rngs`` given to :meth:`save`.
          skip_corrupt: with ``step=None``: if the latest checkpoint is corrupt, log a warning naming it
            and its error and try the next older one (for resuming after a crash).

        All or nothing: the metadata and every array group are read and checked (recorded shapes,
        dtypes and fingerprints) before anything is written; after an error the targets hold exactly
        what they held before. Checkpoints whose save was interrupted are never seen: orbax writes a
        step into a temporary folder and renames it when complete (such folders are removed when the
        checkpointer is created, with a warning).

        Returns:
          :class:`RestoredTrainState` ``(step, data_state, extra)``.

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          CorruptFileError: a file of the checkpoint is corrupt, truncated or missing (names the file).
          ValueError: the checkpoint does not fit the targets (the message names the paths).
        """
        _check_targets("TrainCheckpointer.restore", "restore(model, optimizer, step=...)", model, optimizer, rngs)
        self.manager.wait_until_finished()
        if step is not None or not skip_corrupt:
            if step is None:
                step = self.manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
            return self._restore_step(int(step), model, optimizer, rngs)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        for i, s in enumerate(steps):
            try:
                return self._restore_step(s, model, optimizer, rngs)
            except CorruptFileError as e:
                if i == len(steps) - 1:
                    raise
                _log.warning("skipping corrupt checkpoint step %d (%s); trying step %d", s, e, steps[i + 1])
        raise AssertionError("unreachable")

    def _restore_step(self, step: int, model, optimizer, rngs) -> RestoredTrainState:
        step_dir = os.path.join(self.directory, str(step))
        meta = load_json_item(
            lambda: self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"],
            step_dir, "meta", _TRAIN_EXPECTED,
        )
        validate_meta(meta, os.path.join(step_dir, "meta", "metadata"), "lorapro_jax.train", FORMAT_VERSION,
                      _TRAIN_EXPECTED, groups=())
        _check_layers(meta["layers"], model)
        groups = self._groups(model, optimizer, rngs)
        saved_groups = meta["groups"]
        if set(saved_groups) != set(groups):
            raise ValueError(
                f"checkpoint step {step} holds the groups {sorted(saved_groups)} but the restore targets give "
                f"{sorted(groups)} (pass the optimizer / rngs iff they were saved)."
            )
        for name, (_, state) in groups.items():
            _check_specs(name, saved_groups[name], _leaf_specs(state))
        fps = meta.get("fingerprints") or {}
        restored = {}
        for name, (_, state) in groups.items():  # read and check every group before writing any
            args = ocp.args.Composite(**{name: ocp.args.StandardRestore(_template(state, saved_groups[name]))})
            restored[name] = restore_item(lambda: self.manager.restore(step, args=args)[name], step_dir, name, _TRAIN_EXPECTED)
            verify_arrays(restored[name], saved_groups[name], fps.get(name), os.path.join(step_dir, name), _TRAIN_EXPECTED)
        for name, (target, state) in groups.items():
            _write_back(target, state, restored[name])
        return RestoredTrainState(step=int(meta["step"]), data_state=meta["data_state"], extra=meta["extra"])

    # -- housekeeping ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous save has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
