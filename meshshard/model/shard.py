"""A shard: a contiguous range of units with only its own weights, run per session with a KV cache.

Input is token ids when the shard starts at `embed`, else the previous shard's hidden state.
Output is the next hidden state, or the last position's logits when the shard ends at `head`.

Longer than our usual module, for a reason: loading, the single and batched forward passes,
and a cache's export and install all work on the shard's modules and its sessions' caches,
which no other module should touch.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meshshard.errors import MeshShardError
from meshshard.model import fused, products, rowcache
from meshshard.model.costs import int4_group
from meshshard.model.kvcache import KVCache
from meshshard.model.quantize import check_quantize, quantize_layers, tensor_bytes
from meshshard.model.source import model_name
from meshshard.model.spec import ModelSpec
from meshshard.progress import progress

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Called after each unit with (unit index, seconds); used by profiling.
UnitTimer = Callable[[int, float], None]


class UnknownSession(KeyError):
    pass


class Shard:
    def __init__(
        self,
        spec: ModelSpec,
        start: int,
        end: int,
        config: Any,
        embed: nn.Module | None,
        layers: list[nn.Module],
        norm: nn.Module | None,
        lm_head: nn.Module | None,
        rotary: nn.Module | None,
        dtype: torch.dtype,
        device: torch.device | None = None,
        quantize: str = "none",
        fuse: bool = True,
    ) -> None:
        spec.check_range(start, end)
        self.spec, self.start, self.end, self.config = spec, start, end, config
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.rotary = rotary
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        self.quantize = quantize
        self.layer_ids = tuple(_layer_index(layer) for layer in layers)
        # transformers' own layers where fuse is False (to compare) or a layer is not plain.
        self._fused = [fused.fuse(layer, config) if fuse else None for layer in layers]
        self._cache_keyword = _cache_keyword(layers[0]) if layers else "cache"
        if self.device.type == "cpu":
            fused.choose_products([f for f in self._fused if f is not None])
        self._sessions: dict[str, KVCache] = {}
        # A split head's picks score several rows (a draft's) in the form the whole head
        # would: through linear, 9 rows over half of SmolLM2's vocabulary took 15.9 ms
        # here, blocked 8.2 (docs/benchmarks/speculation-runs.txt).
        self._picker = self._head_product()
        self._pickers: dict[tuple[int, int], products.Product] = {}

    @classmethod
    def load(
        cls,
        model_dir: Path,
        start: int,
        end: int,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        quantize: str = "none",
        fuse: bool = True,
    ) -> Shard:
        """Build only the modules of units [start, end), read only their weights, and put
        them on `device`, their decoder layers' linear weights quantized to `quantize`;
        plain Llama layers run fused (meshshard.model.fused) unless `fuse` is False."""
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        target = torch.device(device)
        check_quantize(quantize, target, torch_dtype)
        if target.type == "cuda":
            # cuDNN's attention, torch's first choice in half precision on recent GPUs, builds
            # a plan for each new key length, so for every decode step: on an H200 it held
            # SmolLM2 in bfloat16 to 15 tokens/s, 73 without it (docs/benchmarks/gpu-runs.txt).
            torch.backends.cuda.enable_cudnn_sdp(False)
        config = load_config(model_dir)
        spec = ModelSpec.from_config(config, name=model_name(model_dir))
        spec.check_range(start, end)
        group = int4_group(spec.linear_inputs) if quantize == "int4" else 0
        skeleton = _skeleton(config)
        first_layer, last_layer = max(start - 1, 0), min(end - 1, spec.num_layers)
        embed = skeleton.model.embed_tokens if start == 0 else None
        layers = list(skeleton.model.layers[first_layer:last_layer])
        norm = skeleton.model.norm if end == spec.num_units else None
        lm_head = skeleton.lm_head if end == spec.num_units else None
        ends: dict[str, tuple[nn.Module, str]] = {}
        if embed is not None:
            ends["model.embed_tokens.weight"] = (embed, "weight")
        if norm is not None and lm_head is not None:
            ends["model.norm.weight"] = (norm, "weight")
            if not spec.tied_embeddings:
                ends["lm_head.weight"] = (lm_head, "weight")
            elif embed is None:
                ends["model.embed_tokens.weight"] = (lm_head, "weight")
        per_layer = [
            {f"model.layers.{_layer_index(layer)}.{name}": (layer, name)
             for name, _ in layer.named_parameters()}
            for layer in layers
        ]  # fmt: skip
        total = len(ends) + sum(len(w) for w in per_layer)
        with progress(f"loading units {start}..{end - 1}", total) as advance:
            _load_weights(model_dir, ends, torch_dtype, advance)
            # Layer by layer, each moved and quantized before the next is read: a peer never
            # holds more than one layer at full precision, so a quantized shard fits where
            # the planner put it.
            for layer, wanted in zip(layers, per_layer, strict=True):
                _load_weights(model_dir, wanted, torch_dtype, advance)
                quantize_layers([layer.to(target).eval()], quantize, group)
        if lm_head is not None and embed is not None and spec.tied_embeddings:
            # One shard holds both ends of a tied model: share the matrix, as the model does.
            lm_head.weight = embed.weight
        rotary = None
        if layers:
            rotary = type(skeleton.model.rotary_emb)(config=config)
        for module in (embed, norm, lm_head, rotary):
            if module is not None:
                module.to(target).eval()
        products.choose_products([lm_head], target)
        return cls(
            spec, start, end, config, embed, layers, norm, lm_head, rotary, torch_dtype, target,
            quantize, fuse,
        )  # fmt: skip

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.spec.num_units

    @property
    def sessions(self) -> list[str]:
        return list(self._sessions)

    def weight_bytes(self) -> int:
        return _param_bytes([self.embed, *self.layers, self.norm, self.lm_head])

    def unit_weight_bytes(self, unit: int) -> int:
        """Weight bytes of one unit alone (a tied head counts the embedding it reads)."""
        if unit == 0:
            return _param_bytes([self.embed])
        if unit == self.spec.num_units - 1:
            return _param_bytes([self.norm, self.lm_head])
        return _param_bytes([self.layers[unit - max(self.start, 1)]])

    def kv_bytes(self) -> int:
        # A snapshot: status reads this from the event loop while the model thread runs.
        return sum(c.nbytes() for c in list(self._sessions.values()))

    def new_cache(self) -> KVCache:
        return KVCache(self.layer_ids)

    def reserve(self, session: str, positions: int) -> None:
        """Allocate the session's cache for `positions` (what its stage admitted it for) when
        it next grows; a session new here starts with it."""
        self._sessions.setdefault(session, self.new_cache()).reserve(positions)

    def cache_length(self, session: str) -> int:
        """Positions of `session` cached in every layer of this shard (0 for a stranger)."""
        cache = self._sessions.get(session)
        return cache.length if cache is not None else 0

    def truncate(self, session: str, length: int) -> None:
        """Forget the session's positions from `length` on (nothing to do for a stranger)."""
        cache = self._sessions.get(session)
        if cache is not None:
            cache.truncate(length)

    def export(
        self, session: str, layer: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Copies of one layer's first `length` cached positions, or None if it has none."""
        cache = self._sessions.get(session)
        if cache is None or not cache.has(layer):
            return None
        keys, values = cache.layer(layer, length)
        return keys.clone(), values.clone()

    def install(
        self, session: str, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int = 0
    ) -> None:
        """Take one layer's cache for a session from its previous owner: its positions from
        `start` on (a layer past the frame limit comes in pieces, each after the last)."""
        if layer not in self.layer_ids:
            raise ValueError(f"layer {layer} is not in this shard")
        want = (1, self.spec.num_kv_heads, keys.shape[2], self.spec.head_dim)
        if tuple(keys.shape) != want:
            raise ValueError(f"KV of shape {list(keys.shape)}, expected {list(want)}")
        # From a peer of another dtype or device (a mixed mesh): ours from now on.
        keys, values = (t.to(self.device, self.dtype) for t in (keys, values))
        cache = self._sessions.setdefault(session, self.new_cache())
        if start == 0:
            cache.put(layer, keys, values)
        elif (held := cache.held(layer)) != start:
            raise ValueError(f"positions from {start} of layer {layer}, which holds {held}")
        else:
            cache.update(keys, values, layer)

    def take_caches(self) -> dict[str, KVCache]:
        """Every session's cache, leaving this shard with none (it is being replaced)."""
        caches, self._sessions = self._sessions, {}
        return caches

    def adopt(self, caches: dict[str, KVCache]) -> dict[str, KVCache]:
        """Keep the layers of `caches` that this shard runs; return what is left of the rest."""
        rest = {}
        for session, cache in caches.items():
            kept = cache.split(self.layer_ids)
            for layer in (i for i in kept.layers if kept.has(i)):
                here = self._sessions.setdefault(session, self.new_cache())
                if not here.has(layer):  # a handoff that arrived first is newer
                    here.put(layer, *kept.layer(layer))
            if any(cache.has(i) for i in cache.layers):
                rest[session] = cache
        return rest

    def prefill(
        self,
        session: str,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        logits: int = 1,
        head: bool = True,
    ) -> torch.Tensor:
        """Start (or continue, for chunked prefill) a session with several tokens. The last
        shard returns the logits of the last position, or [logits, vocab] of the last
        `logits` positions (to verify a draft), or nothing (logits=0); without the `head`,
        those positions' normed hidden states [logits, hidden], for `pick`s."""
        cache = self._sessions.setdefault(session, self.new_cache())
        if positions is None:
            positions = torch.arange(cache.length, cache.length + x.shape[0])
        return self.forward(cache, x, positions, logits=logits, head=head)

    def decode(self, session: str, x: torch.Tensor, position: int) -> torch.Tensor:
        """One new token for a session that was prefilled."""
        return self.forward(self._cache(session), x, torch.tensor([position]))

    def drop(self, session: str) -> None:
        self._sessions.pop(session, None)

    @torch.inference_mode()
    def forward(
        self,
        cache: KVCache,
        x: torch.Tensor,
        positions: torch.Tensor,
        timer: UnitTimer | None = None,
        logits: int = 1,
        head: bool = True,
    ) -> torch.Tensor:
        """x: [T] ids (first shard) or [T, hidden]; positions: [T], continuing the cache."""
        n = x.shape[0]
        if positions.shape != (n,):
            raise ValueError(f"positions shape {tuple(positions.shape)} != ({n},)")
        if self.layers and not torch.equal(positions, torch.arange(cache.length, cache.length + n)):
            raise ValueError(
                f"positions must continue the cache at {cache.length}, "
                f"got {positions[:4].tolist()}…"
            )
        unit = self.start
        clock = _Clock(timer, self.device)
        x = self._onto_device(x)
        if self.embed is not None:
            h = self.embed(x.long().unsqueeze(0))
            clock.lap(unit)
            unit += 1
        else:
            h = x.to(self.dtype).unsqueeze(0)
        if self.layers:
            assert self.rotary is not None
            pos = positions.to(self.device).unsqueeze(0)
            embeddings = self.rotary(h, pos)
            mask = _causal_mask(positions, cache.length + n, self.device)
            first = unit
            h = self._run_layers(h, mask, pos, embeddings, cache, lambda i: clock.lap(first + i))
            unit += len(self.layers)
        if self.lm_head is not None and self.norm is not None:
            if not logits:  # a prompt's chunk before its last: nothing is sampled from it
                return h.new_empty((0,))
            if not head:
                return self.norm(h[0, -logits:])
            out = self._head(h[0, -logits:])
            clock.lap(unit)
            return out[-1] if logits == 1 else out
        return h[0]

    @torch.inference_mode()
    def decode_batch(
        self,
        sessions: list[str],
        xs: list[torch.Tensor],
        logits: list[int] | None = None,
        head: bool = True,
    ) -> list[torch.Tensor]:
        """Several sessions' next positions in one forward pass: a token each, a token and
        the draft to verify after it, or a prompt's tokens, so rows may differ in length.

        xs: per session [T] ids or [T, hidden], continuing at its own cache length (a session
        new here starts one). Returns per session what a single pass gives: [T, hidden];
        logits of its last logits[i] positions (all T unless told): [vocab] for one position,
        [n, vocab] for several, nothing for none; without the `head`, those positions' normed
        hidden states [n, hidden] (another stage scores them).
        """
        caches = [self._sessions.setdefault(s, self.new_cache()) for s in sessions]
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a batch holds each session once")
        if len(xs) != len(caches) or any(x.shape[0] < 1 for x in xs):
            raise ValueError("a batch needs one or more positions per session")
        for cache in caches:
            # A layer may hold positions past the others (kept across a plan change while the
            # rest were fed again, or a draft not confirmed): they are stale, and each row
            # continues at its common length.
            cache.truncate(cache.length)
        widths = [x.shape[0] for x in xs]
        # Packed: the sessions' positions one after another in one sequence, no padding.
        x = self._onto_device(torch.cat(xs)).unsqueeze(0)
        h = self.embed(x.long()) if self.embed is not None else x.to(self.dtype)
        if self.layers:
            assert self.rotary is not None
            pos = torch.cat(
                [torch.arange(c.length, c.length + w) for c, w in zip(caches, widths, strict=True)]
            )
            pos = pos.to(self.device).unsqueeze(0)
            embeddings = self.rotary(h, pos)
            # Each session's positions attend to its own cache (rowcache.attention), seeing
            # their own session only: no mask.
            h = self._run_layers(h, None, pos, embeddings, rowcache.RowCaches(caches, widths))
        real = list(torch.split(h[0], widths))
        if self.lm_head is None or self.norm is None:
            return real
        # The head only where logits are read: it is the widest matrix of the model.
        wanted = widths if logits is None else logits
        read = [r[r.shape[0] - n :] for r, n in zip(real, wanted, strict=True)]
        if not head:
            return list(torch.split(self.norm(torch.cat(read)), wanted))
        out = torch.split(self._head(torch.cat(read)), wanted) if sum(wanted) else read
        return [
            o[0] if n == 1 else o if n else o.new_empty((0,))
            for o, n in zip(out, wanted, strict=True)
        ]

    @property
    def head_weight(self) -> torch.Tensor | None:
        """The head's matrix [vocab, hidden]: the last shard's, or the first's embedding
        where the model ties the two."""
        module = self.lm_head if self.lm_head is not None else self.embed
        if module is None or (module is self.embed and not self.spec.tied_embeddings):
            return None
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def _head_product(self) -> products.Product | None:
        """The head's matrix as a product in forms chosen for this host: the last shard's
        head's, or a first shard's tied embedding, timed here (about a second, once)."""
        weight = self.head_weight
        if weight is None:
            return None
        product = getattr(self.lm_head, "product", None)
        if isinstance(product, products.Product):
            return product
        product = products.Product(weight.data)
        if self.device.type == "cpu" and type(weight.data) is torch.Tensor:
            products.choose([product], products.FORMS)
        return product

    @torch.inference_mode()
    def pick(
        self, h: torch.Tensor, start: int, end: int
    ) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """The best token of vocabulary rows [start, end) for each normed hidden state of h
        [rows, hidden], and their float32 logits: the numbers the whole head gives those
        rows (each is the same dot product), so the best of two picks is the whole head's."""
        if self._picker is None:
            raise ValueError("this shard holds no head matrix to pick from")
        if (picker := self._pickers.get((start, end))) is None:
            picker = self._pickers[(start, end)] = self._picker.part(start, end)
        scores = picker(self._onto_device(h).to(picker.weight.dtype)).float()
        at = torch.argmax(scores, dim=-1)  # ties to the lower id, as the whole head's pick
        best = scores.gather(-1, at.unsqueeze(-1)).squeeze(-1)
        return tuple(best.tolist()), tuple(start + i for i in at.tolist())

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab] of hidden states [rows, hidden]."""
        assert self.lm_head is not None and self.norm is not None
        return self.lm_head(self.norm(h)).float()

    def _run_layers(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None,
        pos: torch.Tensor,
        embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run the decoder layers; `after_layer(i)` is called after layer i (for timing)."""
        cos, sin = (e.unsqueeze(1) for e in embeddings)
        for i, (layer, fast) in enumerate(zip(self.layers, self._fused, strict=True)):
            if fast is not None:
                h = fast(h, mask, cos, sin, cache)
            else:
                h = layer(
                    h,
                    attention_mask=mask,
                    position_ids=pos,
                    position_embeddings=embeddings,
                    **{self._cache_keyword: cache},
                )
            if after_layer is not None:
                after_layer(i)
        return h

    def _onto_device(self, x: torch.Tensor) -> torch.Tensor:
        """The one copy of a step's input onto the device (none on a CPU); from pinned host
        memory on CUDA, so the copy runs beside the work already queued."""
        if x.device == self.device:
            return x
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def _cache(self, session: str) -> KVCache:
        try:
            return self._sessions[session]
        except KeyError:
            raise UnknownSession(session) from None


def load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    rowcache.register()
    config._attn_implementation = rowcache.ATTENTION
    return config


def load_spec(model_dir: Path) -> ModelSpec:
    return ModelSpec.from_config(load_config(model_dir), name=model_name(model_dir))


def import_code(model_dir: Path) -> None:
    """Import torch, transformers and the model's own module without building anything: a
    peer does it first, so the first shard it loads (in a failover, say) does not wait
    seconds for imports, and the imports can be frozen out of garbage collection."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(load_config(model_dir))]


def _skeleton(config: Any) -> Any:
    """The whole model on the meta device: module shapes without allocating any weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _load_weights(
    model_dir: Path,
    wanted: dict[str, tuple[nn.Module, str]],
    dtype: torch.dtype,
    advance: Callable[[int], None],
) -> None:
    from safetensors import safe_open

    remaining = dict(wanted)
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in [k for k in f.keys() if k in remaining]:  # noqa: SIM118 (safe_open has no __iter__)
                module, name = remaining.pop(key)
                tensor = f.get_tensor(key).to(dtype)
                _set_param(module, name, nn.Parameter(tensor, requires_grad=False))
                advance(1)
    if remaining:
        raise MeshShardError(
            f"weights missing in {model_dir}: {', '.join(sorted(remaining)[:3])}"
            + (" …" if len(remaining) > 3 else "")
        )


def _cache_keyword(layer: nn.Module) -> str:
    """The name a decoder layer takes its cache by: `cache` in recent transformers releases,
    `past_key_values` before (5.17 has only that, and ignores any other name silently)."""
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layer_index(layer: nn.Module) -> int:
    """The decoder layer's index in the whole model: the KV cache is addressed by it."""
    attention: Any = layer.self_attn
    return int(attention.layer_idx)


def _param_bytes(modules: list[nn.Module | None]) -> int:
    params = {id(p): p for m in modules if m is not None for p in m.parameters()}
    return sum(tensor_bytes(p) for p in params.values())


def _set_param(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, value)


def _causal_mask(
    positions: torch.Tensor, kv_length: int, device: torch.device
) -> torch.Tensor | None:
    """Query at position p sees keys 0..p. A single decode token sees everything: no mask.
    `positions` is on the host (checked there, without a device sync)."""
    if positions.shape[0] == 1 and int(positions[0]) == kv_length - 1:
        return None
    keys = torch.arange(kv_length)
    return (keys[None, :] <= positions[:, None])[None, None].to(device)


class _Clock:
    """Times units for a profile; on CUDA it waits for each unit's kernels (only when
    timing: a step's hot path never syncs with the device)."""

    def __init__(self, timer: UnitTimer | None, device: torch.device) -> None:
        self._timer = timer
        self._sync = device.type == "cuda"
        self._last = time.perf_counter()

    def lap(self, unit: int) -> None:
        if self._timer is not None:
            if self._sync:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self._timer(unit, now - self._last)
            self._last = now
