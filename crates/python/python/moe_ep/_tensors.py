"""Tensors in and out of the native layer, for torch tensors (CUDA or CPU) and numpy arrays.

Inputs are checked (type, dtype, shape, device, contiguity: `TypeError` / `ValueError` that say
what was expected) and passed as `(data pointer, bytes)` without copying. Outputs arrive as
native byte arrays and are viewed, without copying, as tensors of the caller's kind.

numpy has no bfloat16 / float8: on the CPU back end `uint16` arrays hold bf16 bits and
`uint8` arrays fp8 e4m3 bits (ml_dtypes' `bfloat16` / `float8_e4m3fn` are accepted too).
"""
import sys

import numpy as np

# Canonical dtype names -> element size.
_SIZES = {"bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float32": 4, "int32": 4, "int64": 8, "bool": 1}
# numpy dtype names -> canonical (raw bit containers for the types numpy lacks).
_NUMPY = {
    "uint16": "bfloat16", "bfloat16": "bfloat16", "uint8": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
    "float16": "float16", "float32": "float32", "int32": "int32", "int64": "int64", "bool": "bool",
}
_NUMPY_OUT = {"bfloat16": np.uint16, "float16": np.float16, "float8_e4m3fn": np.uint8, "float32": np.float32,
              "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def itemsize(dtype):
    """Bytes per element of a canonical dtype name."""
    return _SIZES[dtype]


def _torch():
    return sys.modules.get("torch")


def is_torch(obj):
    t = _torch()
    return t is not None and isinstance(obj, t.Tensor)


# Per-call costs matter (an LL dispatch of one token takes microseconds on the GPU): what can
# be looked up once is.
_TORCH_DTYPE_NAMES = {}  # torch.dtype -> canonical name
_DEVICES = {}  # 'cpu' / 'cuda:N' -> (is_cuda, index)


def _torch_dtype_name(dtype):
    name = _TORCH_DTYPE_NAMES.get(dtype)
    if name is None:
        name = _TORCH_DTYPE_NAMES.setdefault(dtype, str(dtype).replace("torch.", ""))
    return name


def _device(device):
    d = _DEVICES.get(device)
    if d is None:
        cuda = device.startswith("cuda")
        d = _DEVICES.setdefault(device, (cuda, int(device.partition(":")[2] or 0) if cuda else -1))
    return d


def kind(obj, name):
    """'torch' or 'numpy'; TypeError for anything else."""
    if is_torch(obj):
        return "torch"
    if isinstance(obj, np.ndarray):
        return "numpy"
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(obj).__name__}")


def dtype_name(obj):
    if is_torch(obj):
        return _torch_dtype_name(obj.dtype)
    return _NUMPY.get(obj.dtype.name, obj.dtype.name)


def device_of(obj):
    """'cpu' or 'cuda:N'."""
    if is_torch(obj) and obj.is_cuda:
        return f"cuda:{obj.device.index}"
    return "cpu"


def is_contiguous(obj):
    return obj.is_contiguous() if is_torch(obj) else obj.flags["C_CONTIGUOUS"]


def contiguous(obj):
    """A row-major copy (on torch's current stream), or `obj` when it is one already."""
    if is_contiguous(obj):
        return obj
    return obj.contiguous() if is_torch(obj) else np.ascontiguousarray(obj)


def check(obj, name, device, dtypes, ndim, shape=None, strided=False):
    """Checks one input tensor; returns it. `shape` entries of None are free; `strided`
    accepts any strides (the caller copies)."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        # The common case, quickly; anything off goes through the general checks for the message.
        cuda, index = _device(device)
        if (_torch_dtype_name(obj.dtype) in dtypes and obj.dim() == ndim and obj.is_cuda == cuda
                and (not cuda or obj.get_device() == index) and (strided or obj.is_contiguous())
                and (shape is None or all(w is None or g == w for g, w in zip(obj.shape, shape)))):
            return obj
    kind(obj, name)
    dt = dtype_name(obj)
    if dt not in dtypes:
        want = " or ".join(dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {dt}")
    if len(obj.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(obj.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(obj.shape, shape)):
            if want is not None and got != want:
                pretty = tuple("*" if w is None else w for w in shape)
                raise ValueError(f"{name}: expected shape {pretty}, got {tuple(obj.shape)} (dimension {i})")
    where = device_of(obj)
    if where != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {where}")
    if not strided and not is_contiguous(obj):
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    return obj


def mem(obj):
    """(data pointer, bytes) of a checked tensor."""
    if obj is None:
        return None
    if is_torch(obj):
        return (obj.data_ptr(), obj.numel() * obj.element_size())
    return (obj.ctypes.data, obj.nbytes)


def swap_last_two(a):
    """A view with the last two dimensions swapped (torch or numpy), no copy."""
    if is_torch(a):
        return a.transpose(-1, -2)
    return np.swapaxes(a, -1, -2)


def out(arr, like, device, dtype, shape):
    """Views native bytes `arr` as a tensor of `like`'s kind ('torch'/'numpy') without copying."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    torch = _torch()
    if like == "torch":
        tdt = getattr(torch, dtype)
        if numel == 0:
            return torch.empty(shape, dtype=tdt, device=device)
        if device == "cpu":
            raw = torch.from_numpy(np.asarray(arr))
        else:
            raw = torch.as_tensor(arr, device=device)
        return raw[: numel * _SIZES[dtype]].view(tdt).view(shape)
    ndt = _NUMPY_OUT[dtype]
    if numel == 0:
        return np.empty(shape, dtype=ndt)
    return np.asarray(arr)[: numel * _SIZES[dtype]].view(ndt).reshape(shape)


def empty(like, device, dtype, shape):
    torch = _torch()
    if like == "torch":
        return torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    return np.empty(shape, dtype=_NUMPY_OUT[dtype])


def zeros(like, device, dtype, shape):
    torch = _torch()
    if like == "torch":
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
    return np.zeros(shape, dtype=_NUMPY_OUT[dtype])


def current_stream(device):
    """Raw CUstream of torch's current stream on `device` (0 on the CPU)."""
    cuda, index = _device(device)
    torch = _torch()
    if not cuda or torch is None:
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what torch.cuda.current_stream reads
    if raw is not None:
        return raw(index)
    return torch.cuda.current_stream(torch.device(device)).cuda_stream
