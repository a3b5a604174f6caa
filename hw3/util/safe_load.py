"""The one way the project reads torch files: tensors, storages and plain containers, never other pickled objects.

torch.load unpickles, and unpickling calls whatever functions a file names, so a crafted weight file or training state
can run code. torch >= 2.10 restricts this soundly with weights_only=True; torch 1.12, the course's, has no
such switch and torch 1.13-2.9's had holes (TRUSTED_WEIGHTS_ONLY below), so there the same rule is enforced by a
restricted unpickler handed to torch.load as its pickle_module (torch subclasses its Unpickler for the main pickle and
calls its load() for the legacy format's headers). TorchScript archives are refused on every version. A file either
loads under the rule or is refused with one line; nothing here ever retries with a full unpickle.
"""
from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import inspect
import os
import pickle
import re
import types
import zipfile
from typing import Dict, Iterator, Sequence

import torch

from hw3.util.errors import UserError

HAS_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters  # torch >= 1.13
# torch's own weights_only loader let crafted files run code before 2.6 (CVE-2025-32434, through TorchScript archives)
# and corrupt memory before 2.10 (CVE-2026-24747, unchecked opcodes): older torch gets the restricted unpickler.
TRUSTED_WEIGHTS_ONLY = HAS_WEIGHTS_ONLY and tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 10)
FORCE_RESTRICTED_UNPICKLER = False  # True: the torch-1.12 path on any torch (tests run both paths in both lanes)
REFUSED = "holds objects other than tensors and plain containers, which could run code; refused"
# torch's tensor rebuild functions (torch/_weights_only_unpickler.py keeps the same list); those a torch lacks are skipped
REBUILD_FUNCTIONS = ("_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_tensor",
                     "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_sparse_tensor", "_rebuild_sparse_csr_tensor",
                     "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
                     "_rebuild_device_tensor_from_cpu_tensor")
_torch_load = torch.load  # the real one, also while restricted_torch_load() has replaced torch.load
_allowed = {}  # type: Dict[str, object]


class Refused(pickle.UnpicklingError):
    """The file names a global outside the allowlist, or asks to call or build something that is not admitted."""


def allowed_globals() -> Dict[str, object]:
    """'module.name' -> object: what torch's weights_only unpickler admits (torch/_weights_only_unpickler.py,
    _get_allowed_globals), minus the storage classes (torch.load's own wrapper resolves storage names before us)."""
    if not _allowed:
        import _codecs

        _allowed.update({"collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
                         "torch.nn.parameter.Parameter": torch.nn.Parameter, "torch.Size": torch.Size,
                         "torch.Tensor": torch.Tensor, "torch.device": torch.device,
                         "torch.serialization._get_layout": torch.serialization._get_layout,
                         "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
                         "_codecs.encode": _codecs.encode, "builtins.bytearray": bytearray, "builtins.set": set,
                         "builtins.complex": complex})
        for value in vars(torch).values():  # dtypes (torch.float16...) and quantisation schemes, pickled by name
            if isinstance(value, (torch.dtype, torch.qscheme)):
                _allowed[str(value)] = value
        for cls in getattr(torch, "_tensor_classes", ()):  # legacy tensor types: torch.FloatTensor...
            _allowed["%s.%s" % (cls.__module__, cls.__name__)] = cls
        for name in REBUILD_FUNCTIONS:
            if hasattr(torch._utils, name):
                _allowed["torch._utils." + name] = getattr(torch._utils, name)
    return _allowed


def _admitted(obj) -> bool:
    return any(obj is value for value in allowed_globals().values())


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden one by one
    """Resolves only allowed globals, calls only them, and builds state only into tensors and OrderedDicts."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load(self):
        try:
            return super().load()
        except KeyError as err:  # how the pure-Python unpickler meets a byte that is no opcode
            if err.args and isinstance(err.args[0], int):
                raise pickle.UnpicklingError("not a pickle: invalid load key %r" % chr(err.args[0])) from None
            raise

    def find_class(self, module: str, name: str):
        if self.proto < 3 and self.fix_imports:  # torch.save writes protocol 2, with Python 2 names
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = "%s.%s" % (module, name)
        if key not in allowed_globals():
            raise Refused("global %s is not allowed" % key)
        return allowed_globals()[key]

    def _call_admitted(self, func, args):
        if not _admitted(func):
            raise Refused("call of %r is not allowed" % (func,))
        return func(*args)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call_admitted(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, {})

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, kwargs)

    def _new(self, cls, args, kwargs):
        if not _admitted(cls):
            raise Refused("object of %r is not allowed" % (cls,))
        return torch.nn.Parameter(*args, **kwargs) if cls is torch.nn.Parameter else cls.__new__(cls, *args, **kwargs)

    def _instantiate(self, klass, args):  # the INST and OBJ opcodes
        self.append(self._call_admitted(klass, args))

    def load_build(self):  # as torch's weights_only unpickler: legacy tensors, parameters, OrderedDict attributes
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is torch.Tensor:
            inst.set_(*state)
        elif type(inst) is torch.nn.Parameter:
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict):
            inst.__dict__.update(state)
        else:
            raise Refused("setting the state of %s is not allowed" % type(inst).__name__)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def _restricted_pickle_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


RESTRICTED_PICKLE = types.ModuleType("safe_load_restricted_pickle", "torch.load's pickle_module on torch < 1.13")
RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler
RESTRICTED_PICKLE.load = _restricted_pickle_load


def _is_torchscript(f) -> bool:
    """A TorchScript archive, which torch 1.12's torch.load would hand to torch.jit.load instead of unpickling."""
    position = f.tell() if hasattr(f, "tell") else None
    try:
        if not zipfile.is_zipfile(f):
            return False
        with zipfile.ZipFile(f) as archive:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    finally:
        if position is not None:
            f.seek(position)


def _one_line(err: BaseException) -> str:
    """The reason in an error, on one line; torch's weights_only message wraps it in paragraphs of advice."""
    text = str(err)
    if "Weights only load failed" in text:
        reason = re.search(r"WeightsUnpickler error: (.*)", text)
        paragraphs = [p for p in text.split("\n\n") if p.strip() and not p.startswith(("Weights only", "Check the"))]
        text = reason.group(1) if reason and reason.group(1).strip() else (paragraphs or [text])[0]
    return " ".join(text.split())[:200] or type(err).__name__


def _refused(err: BaseException) -> bool:
    """Whether the loader refused what the file asks for (rather than failing to read it): our unpickler says so by
    its exception; torch's weights_only one says "Weights only load failed", also for bytes that are no pickle at all
    ("Unsupported operand"), which are a read error."""
    text = str(err)
    return isinstance(err, Refused) or ("Weights only load failed" in text and "Unsupported operand" not in text
                                        ) or "Cannot use ``weights_only=True``" in text


def load(f, what: str = "file", map_location="cpu"):
    """The object in torch file `f` (a path or a binary file), restricted to tensors, storages and plain containers;
    anything else, and any file torch cannot read, raises UserError naming `what` and the file."""
    name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "<stream>")
    if isinstance(f, (str, os.PathLike)) and not os.path.isfile(f):
        raise UserError("%s not found: %s" % (what, name))
    try:
        with open(f, "rb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as opened:
            if _is_torchscript(opened):
                raise Refused("a TorchScript archive, which torch.load would run through torch.jit.load")
            if TRUSTED_WEIGHTS_ONLY and not FORCE_RESTRICTED_UNPICKLER:
                return _torch_load(opened, map_location=map_location, weights_only=True)
            kwargs = dict(weights_only=False) if HAS_WEIGHTS_ONLY else {}  # the restriction is pickle_module
            return _torch_load(opened, map_location=map_location, pickle_module=RESTRICTED_PICKLE, **kwargs)
    except Exception as err:  # unpickling, zip and format errors alike; never retried without the restriction
        if _refused(err):
            raise UserError("%s %s %s (%s)" % (what, name, REFUSED, _one_line(err))) from None
        raise UserError("cannot read %s %s: %s" % (what, name, _one_line(err))) from None


def load_tensors(path: str, what: str = "weight file", unwrap: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """A flat {name: tensor} dict of finite tensors from a torch file or a .safetensors file. `unwrap`: keys of a
    wrapping dict (e.g. "state_dict") whose value is taken instead, the first one present."""
    if str(path).endswith(".safetensors"):
        if not os.path.isfile(path):
            raise UserError("%s not found: %s" % (what, path))
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as err:  # a header or data error in the file
            raise UserError("cannot read %s %s: %s" % (what, path, _one_line(err))) from None
    else:
        state = load(path, what)
    if isinstance(state, dict):
        key = next((k for k in unwrap if isinstance(state.get(k), dict)), None)
        state = state[key] if key is not None else state
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError("%s %s is not a flat dict of named tensors (a state dict)" % (what, path))
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # NaN or inf weights give garbage without an error downstream (a caption of punctuation)
        raise UserError("%s %s holds NaN or infinite values in %d tensor(s): %s%s" % (
            what, path, len(broken), ", ".join(broken[:3]), " ..." if len(broken) > 3 else ""))
    return dict(state)


@contextlib.contextmanager
def restricted_torch_load(what: str = "weight file") -> Iterator[None]:
    """Makes torch.load the safe one while library code that reads files itself runs (timm's pretrained and hub
    loading, open_clip, OpenAI clip); their weights_only/mmap/pickle arguments are accepted and ignored."""
    def safe_torch_load(f, map_location="cpu", *args, **kwargs):
        return load(f, what, map_location=map_location)

    previous, torch.load = torch.load, safe_torch_load
    try:
        yield
    finally:
        torch.load = previous
