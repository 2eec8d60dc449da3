"""IA3Model: inject IA3 layers into a transformers model, manage named adapters, fold them.

Names are PEFT's everywhere: a vector's key is `base_model.model.<module path>.ia3_l`, so
adapters move between this tool and PEFT unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..formats import adapter_format as fmt
from .config import HEADS_FOR_TASK, IA3Config, candidate_names, describe, matches
from ..errors import IA3Error
from .layers import WRAPPABLE, IA3Layer, SavedModule


class IA3Model(nn.Module):
    """A transformers model with IA3 layers; the base weights are frozen and shared by all adapters."""

    def __init__(self, model: nn.Module, config: IA3Config | None = None, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
        self.configs: dict[str, IA3Config] = {}
        self.active_adapters: tuple[str, ...] = ()
        model.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # -- structure -------------------------------------------------------------------------
    def ia3_layers(self) -> dict[str, IA3Layer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, IA3Layer)}

    def saved_modules(self) -> dict[str, SavedModule]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SavedModule)}

    def _plain_modules(self) -> Iterable[tuple[str, nn.Module]]:
        """Modules under their original names; our wrappers stand for what they wrap.

        A module shared under two names (tied embeddings) comes once, as in named_modules().
        """
        seen = set()

        def walk(prefix: str, module: nn.Module):
            for child_name, child in module.named_children():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                name = f"{prefix}{child_name}"
                yield name, child
                if not isinstance(child, (IA3Layer, SavedModule)):
                    yield from walk(name + ".", child)

        yield from walk("", self.model)

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def _targets(self, config: IA3Config, heads: list[str], check_feedforward: bool = True) -> dict[str, bool]:
        """Module path -> feed-forward flag for every module the config targets.

        As in PEFT, modules inside task heads (modules_to_save) are never targeted, and
        "all-linear" also leaves out the output embeddings.
        """
        output_layer = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        found, linear_names, candidates = {}, [], []
        for name, module in self._plain_modules():
            base = module.base_layer if isinstance(module, IA3Layer) else module
            if isinstance(base, WRAPPABLE):
                linear_names.append(name)
            if any(name == h or name.startswith(h + ".") for h in heads):
                continue  # a head trains in full; PEFT never targets inside one either
            if isinstance(base, WRAPPABLE):
                candidates.append(name)
            if config.all_linear:
                hit = isinstance(base, WRAPPABLE) and base is not output_layer
            else:
                hit = matches(name, config.target_modules)
            if not hit or matches(name, config.exclude_modules):
                continue
            if not isinstance(base, WRAPPABLE):
                raise IA3Error(
                    f"target {name} is a {type(base).__name__}; IA3 wraps nn.Linear and Conv1D only. "
                    "Narrow target_modules so it is not matched"
                )
            found[name] = matches(name, config.feedforward_modules, suffix_needs_dot=False)
        stray = [n for n in candidates if n not in found and matches(n, config.feedforward_modules, suffix_needs_dot=False)
                 and not matches(n, config.exclude_modules)]
        if stray and check_feedforward and not config.all_linear:
            raise IA3Error(
                f"feedforward_modules [{describe(config.feedforward_modules)}] match {stray[0]}, which is not a target; "
                "every feed-forward module must also be in target_modules"
            )
        if not found:
            raise IA3Error(
                f"target_modules [{describe(config.target_modules)}] matched no module of this "
                f"{self.model_type} model; its Linear layers are named: {candidate_names(linear_names)}"
            )
        return found

    # -- adapters --------------------------------------------------------------------------
    def add_adapter(self, name: str, config: IA3Config, strict: bool = True) -> None:
        """Wrap the targeted layers (once) and give each a vector for this adapter.

        config: our IA3Config or PEFT's `peft.IA3Config` (the same fields, read as PEFT means them).

        strict=False skips the checks on feedforward_modules (a subset of target_modules, no
        stray matches), for adapters PEFT wrote: it saves "all-linear" expanded into full module
        names beside feedforward_modules such as ["down_proj"], a file PEFT itself cannot reload.
        """
        config = IA3Config.coerce(config)
        if name in self.configs:
            raise IA3Error(f"an adapter named {name!r} already exists; delete it or pick another name")
        if strict:
            _check_feedforward_subset(config)  # before defaults are filled in, as PEFT does
        explicit_ff = config.feedforward_modules is not None
        config = config.resolved(self.model_type)
        heads = self._heads(config)
        targets = self._targets(config, heads, check_feedforward=strict and explicit_ff)
        for path, feedforward in targets.items():
            layer = self.model.get_submodule(path)
            if not isinstance(layer, IA3Layer):
                layer = IA3Layer(layer)
                self._replace(path, layer)
            layer.add_adapter(name, feedforward, init_ones=config.init_ia3_weights)
        for path in heads:
            module = self.model.get_submodule(path)
            if not isinstance(module, SavedModule):
                module = SavedModule(module)
                self._replace(path, module)
            module.add_adapter(name)
        self.configs[name] = config
        self.set_adapter(self.active_adapters)

    def _heads(self, config: IA3Config) -> list[str]:
        """Module paths of modules_to_save (explicit ones must exist; the task's usual heads may not).

        PEFT writes both `classifier` and `score` into a SEQ_CLS adapter's modules_to_save, though
        a model has one of them: those two stay optional even when listed.
        """
        wanted = config.heads_to_save()
        paths = [n for n, _ in self._plain_modules() if any(n == w or n.endswith("." + w) for w in wanted)]
        optional = HEADS_FOR_TASK.get(config.task_type or "", [])
        for explicit in [m for m in config.modules_to_save or [] if m not in optional]:
            if not any(p == explicit or p.endswith("." + explicit) for p in paths):
                raise IA3Error(f"modules_to_save entry {explicit!r} names no module of this {self.model_type} model")
        return paths

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Activate one adapter or several (their vectors multiply); only active ones train."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for n in names:
            self._require(n)
        self.active_adapters = names
        for module in [*self.ia3_layers().values(), *self.saved_modules().values()]:
            module.active = names
        for layer in self.ia3_layers().values():
            for n, p in layer.ia3_l.items():
                p.requires_grad_(n in names)
        for saved in self.saved_modules().values():
            for n, m in saved.copies.items():
                m.requires_grad_(n in names)

    @contextlib.contextmanager
    def disable_adapters(self):
        """Run as the base model for a while (folded adapters stay in the weights)."""
        active = self.active_adapters
        for module in [*self.ia3_layers().values(), *self.saved_modules().values()]:
            module.active = ()
        try:
            yield
        finally:
            self.set_adapter(active)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if any(name in layer.folded for layer in self.ia3_layers().values()):
            raise IA3Error(f"adapter {name!r} is folded into the weights; unfold it before deleting it")
        for path, layer in self.ia3_layers().items():
            if name in layer.ia3_l:
                layer.delete_adapter(name)
            if not layer.ia3_l and not layer.folded:  # nothing left: put the plain layer back
                self._replace(path, layer.base_layer)
        for path, saved in self.saved_modules().items():
            if name in saved.copies:
                del saved.copies[name]
            if not saved.copies:
                self._replace(path, saved.original_module)
        del self.configs[name]
        self.set_adapter(tuple(a for a in self.active_adapters if a != name))

    def _require(self, name: str) -> None:
        if name not in self.configs:
            raise IA3Error(f"no adapter named {name!r}; loaded adapters: {', '.join(self.configs) or 'none'}")

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, counted as PEFT does."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def trainable_report(self) -> str:
        trainable, total = self.trainable_parameters()
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

    # -- PEFT format -----------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's keys and shapes."""
        self._require(name)
        state = {}
        for path, layer in self.ia3_layers().items():
            if name in layer.ia3_l:
                state[fmt.vector_key(path)] = layer.ia3_l[name].detach().reshape(layer.vector_shape(name))
        for path, saved in self.saved_modules().items():
            if name in saved.copies:
                for key, value in saved.copies[name].state_dict().items():
                    state[f"{fmt.PREFIX}{path}.{key}"] = value.detach()
        return state

    def save_adapter(self, path: str, name: str | None = None, force: bool = False) -> str:
        """Write a PEFT adapter folder (atomically)."""
        name = name or self._only_adapter()
        self._require(name)
        config = self.configs[name]
        has_conv1d = any(layer.is_conv1d and name in layer.ia3_l for layer in self.ia3_layers().values())
        config = dataclasses.replace(config, fan_in_fan_out=has_conv1d or config.fan_in_fan_out)
        state = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict(name).items()}
        return fmt.write_adapter(path, config, state, force=force)

    def load_adapter(self, source: str | fmt.AdapterFile, name: str | None = None, activate: bool = True) -> str:
        """Load a PEFT adapter folder; any mismatch with this model is an error naming the key."""
        adapter = fmt.read_adapter(source) if isinstance(source, str) else source
        name = name or adapter.name
        try:
            self.add_adapter(name, adapter.config, strict=False)
        except IA3Error as e:
            raise IA3Error(f"{adapter.path or 'the adapter'}: {e}") from None
        try:
            self._load_tensors(name, adapter)
        except BaseException:
            self.delete_adapter(name)
            raise
        if activate:
            self.set_adapter(name)
        return name

    def _load_tensors(self, name: str, adapter: fmt.AdapterFile) -> None:
        expected = self.adapter_state_dict(name)
        where = adapter.path or "the adapter"
        for key in adapter.tensors:
            if key not in expected:
                raise IA3Error(
                    f"{where}: key {key} names no IA3 target or saved module of this {self.model_type} model "
                    "under the adapter's own config; was the adapter trained for another model?"
                )
        for key, target in expected.items():
            if key not in adapter.tensors:
                raise IA3Error(f"{where}: missing key {key}; the adapter is incomplete for its own target_modules")
            value = adapter.tensors[key]
            if tuple(value.shape) != tuple(target.shape):
                raise IA3Error(
                    f"{where}: {key} has shape {tuple(value.shape)}, this model needs {tuple(target.shape)}; "
                    "was the adapter trained for another model?"
                )
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(torch.from_numpy(np.ascontiguousarray(adapter.tensors[key])))

    def _only_adapter(self) -> str:
        if len(self.configs) != 1:
            raise IA3Error(f"several adapters are loaded ({', '.join(self.configs)}); name the one to use")
        return next(iter(self.configs))

    # -- folding ---------------------------------------------------------------------------
    def _check_vectors(self, names: Iterable[str], forbid_zero: bool) -> None:
        for path, layer in self.ia3_layers().items():
            for name in names:
                if name not in layer.ia3_l:
                    continue
                vector = layer.ia3_l[name].detach()
                if not torch.isfinite(vector).all():
                    raise IA3Error(f"adapter {name!r} has non-finite values in {path}; it cannot be folded")
                if forbid_zero and (vector == 0).any():
                    raise IA3Error(
                        f"adapter {name!r} has zeros in {path}; unfolding would divide by zero, so the weights stay as they are"
                    )

    def fold(self, names: str | Iterable[str] | None = None) -> None:
        """Multiply adapters into the base weights; forward then skips them (same outputs)."""
        names = self._names(names)
        self._check_vectors(names, forbid_zero=False)
        for layer in self.ia3_layers().values():
            for name in names:
                if name in layer.ia3_l and name not in layer.folded:
                    layer.rescale_weights(name)
                    layer.folded.append(name)

    def unfold(self, names: str | Iterable[str] | None = None) -> None:
        """Divide folded adapters back out of the weights; refused where a vector has zeros."""
        names = [n for n in self._names(names) if any(n in l.folded for l in self.ia3_layers().values())]
        self._check_vectors(names, forbid_zero=True)
        for layer in self.ia3_layers().values():
            for name in names:
                if name in layer.folded:
                    layer.rescale_weights(name, inverse=True)
                    layer.folded.remove(name)

    def _names(self, names) -> list[str]:
        names = list(self.active_adapters) if names is None else [names] if isinstance(names, str) else list(names)
        for n in names:
            self._require(n)
        return names

    def merge_and_unload(self, names: str | Iterable[str] | None = None) -> nn.Module:
        """Fold the adapters and return the plain transformers model (this wrapper is spent)."""
        names = self._names(names)
        self.set_adapter(names)
        heads = {path: saved.chosen() for path, saved in self.saved_modules().items()}  # may refuse: before folding
        self.fold(names)
        for path, head in heads.items():
            self._replace(path, head)
        for path, layer in self.ia3_layers().items():
            self._replace(path, layer.base_layer)
        self.model.requires_grad_(False)
        return self.model

    # -- export hooks ----------------------------------------------------------------------
    @contextlib.contextmanager
    def external_vectors(self, vectors: dict[str, torch.Tensor], feedforward: dict[str, bool]):
        """Take each layer's vector from `vectors` (graph inputs) for the duration of a trace."""
        layers = self.ia3_layers()
        unknown = set(vectors) - set(layers)
        if unknown:
            raise IA3Error(f"no IA3 layer at {sorted(unknown)[0]}")
        try:
            for path, vector in vectors.items():
                layers[path].external = (vector, feedforward[path])
            yield
        finally:
            for layer in layers.values():
                layer.external = None

    # -- running ---------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


def _check_feedforward_subset(config: IA3Config) -> None:
    ff, targets = config.feedforward_modules, config.target_modules
    if isinstance(ff, list) and isinstance(targets, list):
        outside = [m for m in ff if m not in targets]
        if outside:
            raise IA3Error(
                f"feedforward_modules {outside} are not in target_modules {targets}; "
                "every feed-forward module must also be a target"
            )
